"""Store containers by format name: ``arrow`` (:mod:`.arrow`) and ``zarr`` (:mod:`.zarr`), each a
:class:`~.base.Container`.

The registry maps a format name to a factory that builds its container; a factory imports its
container's module only when called, so a store that never names ``zarr`` never imports zarr.
Another format registers with :func:`register_container` and can prove itself against
:class:`logitcache.testing.store_conformance.StoreConformance`.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import ConfigError
from .base import Container, Objects

ContainerFactory = Callable[[], Container]

_FACTORIES: dict[str, ContainerFactory] = {}


def register_container(name: str, factory: ContainerFactory) -> None:
    """Make ``get_container(name)`` return ``factory()``; refuses a name already taken."""
    if name in _FACTORIES:
        raise ConfigError(f"store format {name!r} is already registered ({_FACTORIES[name]!r}); "
                          "pick another name for the new container")
    _FACTORIES[name] = factory


def get_container(name: str) -> Container:
    """The container of store format ``name``; a ConfigError names the registered formats otherwise."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"store format must be one of {', '.join(map(repr, _FACTORIES))}; found {name!r}")
    return factory()


def _arrow() -> Container:
    from .arrow import ArrowContainer

    return ArrowContainer()


def _zarr() -> Container:
    import importlib

    for module, package in (("zarr", "zarr"), ("google_crc32c", "google-crc32c")):  # zstandard: a dependency
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"store format 'zarr' needs the {package} package: pip install 'logitcache[zarr]'") \
                from exc
    from .zarr import ZarrContainer

    return ZarrContainer()


register_container("arrow", _arrow)
register_container("zarr", _zarr)

__all__ = ["Container", "ContainerFactory", "Objects", "get_container", "register_container"]
