"""The container protocol: a store format's physical layout (which objects hold a unit, and their bytes).

A container is pure: it turns one unit's encoded rows into ``(path, bytes)`` objects and back, and
never touches a filesystem — the store's commit path writes, fsyncs and checksums what it returns
(:mod:`logitcache.store.commit`). Paths are relative to the store root and ``/``-separated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ..spec import ShardSpec
from ..units import UnitRows

Objects = list[tuple[str, bytes]]  # (path under the store root, the object's bytes), in write order


class Container(Protocol):
    """What a store format provides; register an implementation with
    :func:`logitcache.store.containers.register_container`."""

    def static_objects(self, spec: ShardSpec) -> Objects:
        """Objects written once, when the store is created (e.g. array metadata); may be empty."""
        ...

    def check_static(self, spec: ShardSpec, stored: Mapping[str, bytes | memoryview]) -> list[str]:
        """One line per static object in ``stored`` (those found in the store, by path) that does not say what
        :meth:`static_objects` would for ``spec``; each line starts with the object's path."""
        ...

    def encode_unit(self, spec: ShardSpec, index: int, first_row: int, seq_ids: list[int],
                    rows: list[dict[str, bytes]]) -> Objects:
        """Unit ``index`` (store rows ``first_row`` onward): ``seq_ids`` and, per row, one byte string
        per column of ``spec.columns()``; returns exactly the objects :meth:`unit_paths` names."""
        ...

    def unit_paths(self, spec: ShardSpec, index: int) -> list[str]:
        """The objects unit ``index`` consists of (what its commit record must list), sorted."""
        ...

    def decode_unit(self, spec: ShardSpec, index: int, first_row: int, num_rows: int,
                    objects: Mapping[str, bytes | memoryview]) -> UnitRows:
        """Unit ``index`` read back from its objects (keyed by path); raises
        :class:`~logitcache.errors.CorruptShardError` naming the shard when the bytes do not decode."""
        ...
