"""Deterministic fault injection and tracing for crash tests.

``LOGITCACHE_FAULT="<point>:<n>[:stop]"``: the n-th time (1-based) the process reaches ``<point>``
it kills itself with SIGKILL (or, with ``:stop``, stops itself with SIGSTOP so a test can look at
the paused capture and continue it with SIGCONT). The signal is sent to the thread that reached the point,
so that thread runs no further line (an encode-pool thread mid-write stops inside the write).

``LOGITCACHE_FAULT_TRACE=<path>`` (``-`` for stderr): append one line ``fault-trace <point> <n>
<detail>`` each time a point is reached, so a test can list every point of a run and pick some.

Points, in the order a capture reaches them:

``unit_start``       before a unit's teacher forward (and before its generation, with ``generate`` settings)
``generate``         the HF teacher sampled one response token (detail: the response's length so far), inside
                     the generation loop of a unit, before its targets are captured
``teacher_chunk``    one chunk of the teacher head was computed and sparsified (during the forward)
``mid_write``        inside an atomic write, half the bytes are in the temp file (detail: the file)
``after_shard``      shard renamed into place, commit record not yet written
``after_commit``     unit fully committed
``before_finalize``  all units committed, manifest not yet final
``after_manifest``   final manifest in place, commit records not yet removed
``reader_commits``   (reader side) an incomplete manifest was read, commit records not yet listed
``lock_takeover``    (writer lock) a lock in place was judged stale, not yet removed

With ``LOGITCACHE_FAULT_ONCE=<path>`` also set, only the first process to reach the point creates
``<path>`` and dies; every later one (a restarted Ray worker, say) carries on.

Unset (the default), :func:`fault_point` costs two environment lookups.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

TRACE_PREFIX = "fault-trace"
_hits: dict[str, int] = {}


def fault_point(point: str, detail: str = "") -> None:
    spec = os.environ.get("LOGITCACHE_FAULT")
    trace = os.environ.get("LOGITCACHE_FAULT_TRACE")
    if not spec and not trace:
        return
    hit = _hits[point] = _hits.get(point, 0) + 1
    if trace:
        _write_trace(trace, f"{TRACE_PREFIX} {point} {hit} {detail}".rstrip() + "\n")
    if spec:
        name, n, action = (spec.split(":") + ["1", "kill"])[:3]
        if name == point and hit == int(n or 1) and _first_to_fail():
            # to this thread, not the process: a process-directed signal wakes whichever thread the kernel
            # picks, and under load this one could run on (finish a write, commit a unit) before it stops
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def _write_trace(target: str, line: str) -> None:
    if target == "-":
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    with open(target, "a") as f:
        f.write(line)


def _first_to_fail() -> bool:
    marker = os.environ.get("LOGITCACHE_FAULT_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
