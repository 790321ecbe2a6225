"""Who is reading: a :class:`World` value object, kept apart from probing the environment.

A ``World`` says which rank of how many, and which DataLoader worker of how many, is reading.
The partition of an epoch (:mod:`logitcache.train.partition`) is a pure function of a ``World``; only
:func:`detect_world` looks at the environment (``torch.distributed``, ``RANK``/``WORLD_SIZE``,
``torch.utils.data.get_worker_info()``). Anchor: mosaicml/streaming ``world.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import ConfigError

__all__ = ["World", "detect_world"]


@dataclass(frozen=True)
class World:
    """One reader: ``rank`` of ``world_size`` processes, DataLoader worker ``worker_id`` of ``num_workers``.

    ``num_workers == 0`` means the main process reads (a DataLoader with ``num_workers=0``); it then
    behaves as a single worker with ``worker_id == 0``.
    """

    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "worker_id", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"World.{name} must be an int; found {value!r} ({type(value).__name__})")
        if self.world_size < 1:
            raise ConfigError(f"World.world_size must be >= 1; found {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"World.rank must be in [0, {self.world_size}); found {self.rank}")
        if self.num_workers < 0:
            raise ConfigError(f"World.num_workers must be >= 0; found {self.num_workers}")
        if not 0 <= self.worker_id < self.workers:
            raise ConfigError(f"World.worker_id must be in [0, {self.workers}) with num_workers="
                              f"{self.num_workers}; found {self.worker_id}")

    @property
    def workers(self) -> int:
        """Readers within this rank: ``max(1, num_workers)``."""
        return max(1, self.num_workers)

    @property
    def num_readers(self) -> int:
        """Readers over all ranks: ``world_size * workers``."""
        return self.world_size * self.workers

    @property
    def reader_id(self) -> int:
        """This reader's index among all readers, rank-major."""
        return self.rank * self.workers + self.worker_id

    def with_worker(self, worker_id: int, num_workers: int) -> World:
        """The same rank, read by DataLoader worker ``worker_id`` of ``num_workers``."""
        return replace(self, worker_id=worker_id, num_workers=num_workers)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def detect_world() -> World:
    """The ``World`` of the calling process.

    Rank and world size come from ``torch.distributed`` when it is initialised, else from the
    ``RANK`` and ``WORLD_SIZE`` environment variables (default 0 and 1). Worker id and count come
    from ``torch.utils.data.get_worker_info()`` (``0`` and ``0`` in the main process).
    """
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    info = get_worker_info()
    if info is None:
        return World(rank=rank, world_size=world_size)
    return World(rank=rank, world_size=world_size, worker_id=info.id, num_workers=info.num_workers)
