"""Deterministic fault injection for crash tests.

Set ``LOGITCACHE_FAULT="<point>:<n>"`` and the process kills itself with SIGKILL the n-th time
(1-based) it reaches ``<point>``. Points: ``unit_start`` (before a unit's teacher forward),
``after_shard`` (shard renamed into place, commit record not yet written), ``after_commit``
(unit fully committed), ``before_finalize`` (all units committed, manifest not yet final).
With ``LOGITCACHE_FAULT_ONCE=<path>`` also set, only the first process to reach the point creates
``<path>`` and dies; every later one (a restarted Ray worker, say) carries on. Unset (the default),
:func:`fault_point` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    spec = os.environ.get("LOGITCACHE_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(n or 1) and _first_to_fail():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_to_fail() -> bool:
    marker = os.environ.get("LOGITCACHE_FAULT_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
