"""The resume state of a :class:`~logitcache.train.dataset.CacheDataset`: its checks, and the
bookkeeping of what one process has read.

A state is a dict (JSON-serialisable): the dataset's identity (``version``, ``seed``, ``shuffle``,
``world_size``, ``num_sequences``, ``store_fingerprint``, ``drop_uneven``, ``shuffle_window``,
``pack_tokens``, ``pack_window``), then ``epoch``, ``batch_size``, ``consumed`` (elements of this rank's
share of the epoch already trained on: sequences, or with ``pack_tokens`` packed rows) and ``worker``:
``None``, or for a state taken inside a DataLoader worker ``{"id", "num_workers", "offset"}``, ``offset``
being the elements that worker has handed out of its own share (after ``consumed``). A state without
``worker``, ``pack_tokens`` or ``pack_window`` (saved before they existed) reads them as ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, StoreMismatchError
from .world import World

__all__ = ["Pass", "READ_BY_WORKERS", "validate_state", "worker_offset"]

READ_BY_WORKERS = (
    "CacheDataset.state_dict(): DataLoader worker processes have read this dataset since the last "
    "load_state_dict/set_epoch, and this process does not see how far they got nor what the loader "
    "prefetched. Pass the position: state_dict(batches_consumed=k), k = batches taken from the loader "
    "since then (enumerate index + 1); or checkpoint the loader itself with torchdata's StatefulDataLoader "
    "(loader.state_dict() / loader.load_state_dict()).")


@dataclass
class Pass:
    """One pass over the dataset in one process: who reads it, and how many items it handed out so far
    (a worker's resumed offset included)."""

    reader: tuple[int, int]  # (worker_id, num_workers) of the reading process; num_workers 0 = main process
    yielded: int


_STORE_FIELDS = ("num_sequences", "store_fingerprint")
_LATER_FIELDS = ("pack_tokens", "pack_window")  # None when absent: states saved before packing was a setting


def validate_state(state: dict[str, Any], expected: dict[str, Any], batch_size: int | None, length: int) -> None:
    """Raise on the first field of ``state`` that does not fit, naming it ("found X, expected Y")."""
    if not isinstance(state, dict):
        raise ConfigError(f"state must be a dict from CacheDataset.state_dict(); found {type(state).__name__}")
    for name in (*expected, "epoch", "batch_size", "consumed"):
        if name not in state and name not in _LATER_FIELDS:
            raise ConfigError(f"state field {name!r} is missing; expected a state from CacheDataset.state_dict()")
    for name, value in expected.items():
        if state.get(name) != value:
            error = StoreMismatchError if name in _STORE_FIELDS else ConfigError
            hint = " (the store changed since the state was saved)" if name in _STORE_FIELDS else ""
            raise error(f"state field {name!r}: found {state.get(name)!r}, expected {value!r}{hint}")
    if batch_size is not None and state["batch_size"] not in (None, batch_size):
        raise ConfigError(f"state field 'batch_size': found {state['batch_size']!r}, expected {batch_size!r} "
                          "(resume is exact only with the same batch size)")
    if not isinstance(state["epoch"], int) or state["epoch"] < 0:
        raise ConfigError(f"state field 'epoch': found {state['epoch']!r}, expected an int >= 0")
    consumed = state["consumed"]
    if not isinstance(consumed, int) or not 0 <= consumed <= length:
        raise ConfigError(f"state field 'consumed': found {consumed!r}, expected an int in [0, {length}]")
    if consumed and state["batch_size"] is None:
        raise ConfigError("state field 'batch_size': found None, expected the DataLoader's batch size "
                          "(needed to resume mid-epoch)")


def worker_offset(worker: Any, reader: World, share: int) -> int:
    """The ``offset`` of a worker state, checked against ``reader`` (this process; ``share`` the
    sequences it reads after ``consumed``): only the same worker of a loader with as many workers loads it."""
    if not reader.num_workers:
        raise ConfigError(f"state field 'worker': found {worker!r}, expected None: this is one DataLoader "
                          "worker's state (torchdata StatefulDataLoader); restore the loader with "
                          "StatefulDataLoader.load_state_dict, which hands each worker its own")
    expected = {"id": reader.worker_id, "num_workers": reader.num_workers}
    found = {k: worker.get(k) for k in expected} if isinstance(worker, dict) else worker
    if found != expected:
        raise ConfigError(f"state field 'worker': found {found!r}, expected {expected!r} (a worker state "
                          "resumes only in the same worker, with the same num_workers)")
    offset = worker.get("offset")
    if not isinstance(offset, int) or not 0 <= offset <= share:
        raise ConfigError(f"state field 'worker.offset': found {offset!r}, expected an int in [0, {share}]")
    return offset
