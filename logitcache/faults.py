"""Deterministic fault injection for crash tests.

Set ``LOGITCACHE_FAULT="<point>:<n>"`` and the process kills itself with SIGKILL the n-th time
(1-based) it reaches ``<point>``. Points: ``unit_start`` (before a unit's teacher forward),
``after_shard`` (shard renamed into place, commit record not yet written), ``after_commit``
(unit fully committed), ``before_finalize`` (all units committed, manifest not yet final).
Unset (the default), :func:`fault_point` costs one dict lookup.
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
    if _hits[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
