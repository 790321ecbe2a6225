"""Crash-test helpers: list a capture's fault points, pick some at random, kill there, compare stores.

Used by tests/unit/test_faults.py, tests/integration/test_fault_matrix.py and
benchmarks/fault_matrix.py. A capture is always a separate process (``python -m logitcache.cli``)
so that SIGKILL hits a real process with real files half written.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..faults import TRACE_PREFIX

# where a kill lands, by the fault point (and the file an atomic write was writing)
CATEGORIES = ("teacher forward", "shard mid-write", "between shard and commit", "manifest update")


@dataclass(frozen=True)
class FaultEvent:
    """One time a capture reached a fault point: ``LOGITCACHE_FAULT=<spec>`` kills it right there."""

    point: str
    hit: int
    detail: str = ""

    @property
    def spec(self) -> str:
        return f"{self.point}:{self.hit}"

    @property
    def category(self) -> str | None:
        if self.point == "teacher_chunk":
            return "teacher forward"
        if self.point == "mid_write":
            if self.detail.startswith(("shards/", "data.zarr/")):
                return "shard mid-write"
            return "between shard and commit" if self.detail.startswith("commits/") else "manifest update"
        if self.point == "after_shard":
            return "between shard and commit"
        if self.point in ("before_finalize", "after_manifest"):
            return "manifest update"
        return None


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "logitcache.cli", *args]


def parse_trace(text: str) -> list[FaultEvent]:
    events = []
    for line in text.splitlines():
        if line.startswith(TRACE_PREFIX + " "):
            _, point, hit, *detail = line.split(" ", 3)
            events.append(FaultEvent(point, int(hit), detail[0] if detail else ""))
    return events


def traced_run(args: list[str], trace_file: Path) -> list[FaultEvent]:
    """Run the CLI to completion with tracing on; every fault point it reached, in order."""
    trace_file.unlink(missing_ok=True)
    env = dict(os.environ, LOGITCACHE_FAULT_TRACE=str(trace_file))
    env.pop("LOGITCACHE_FAULT", None)
    done = subprocess.run(cli_command(args), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"traced capture failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_trace(trace_file.read_text())


def choose_events(events: list[FaultEvent], quota: dict[str, int], seed: int) -> list[FaultEvent]:
    """``quota[c]`` distinct events of each category ``c`` drawn with ``random.Random(seed)``, in run order."""
    rng = random.Random(seed)
    chosen = []
    for cat, n in quota.items():
        pool = [e for e in events if e.category == cat]
        if not pool:
            raise RuntimeError(f"the run reached no fault point of category {cat!r}; the fault plan cannot be drawn")
        chosen += rng.sample(pool, min(n, len(pool)))
    order = {e: i for i, e in enumerate(events)}
    return sorted(chosen, key=order.__getitem__)


def run_with_fault(args: list[str], spec: str) -> subprocess.CompletedProcess:
    """Run the CLI with ``LOGITCACHE_FAULT=spec``; the caller checks it died by SIGKILL."""
    env = dict(os.environ, LOGITCACHE_FAULT=spec)
    env.pop("LOGITCACHE_FAULT_TRACE", None)
    return subprocess.run(cli_command(args), env=env, capture_output=True, text=True)


def kill_after_events(args: list[str], events: int) -> int | None:
    """Start the CLI, read its trace from stderr and SIGKILL it from outside after ``events`` trace lines.

    The kill lands wherever the child has got to by then (it keeps running while we react), so the
    exact point is not reproducible; only the lower bound is. Returns the child's return code
    (``-SIGKILL``), or None if it finished first.
    """
    env = dict(os.environ, LOGITCACHE_FAULT_TRACE="-")
    env.pop("LOGITCACHE_FAULT", None)
    proc = subprocess.Popen(cli_command(args), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = 0
    for line in proc.stderr:
        seen += line.startswith(TRACE_PREFIX)
        if seen >= events:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.close()
    code = proc.wait()
    return code if code == -signal.SIGKILL else None


def tree_bytes(root: str | os.PathLike) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lost_and_duplicated(store: str | os.PathLike, reference: str | os.PathLike) -> tuple[int, int]:
    """Sequences of ``reference`` missing from ``store``, and sequences ``store`` holds more than once."""
    from ..store.reader import iter_sequences

    got = Counter(seq_id for seq_id, _, _ in iter_sequences(store))
    want = {seq_id for seq_id, _, _ in iter_sequences(reference)}
    return len(want - set(got)), sum(n - 1 for n in got.values() if n > 1)


def job_args(config, job_file: Path) -> list[str]:
    """CLI arguments that run ``config`` (a CaptureConfig) from a YAML job file written to ``job_file``."""
    import yaml

    job_file.write_text(yaml.safe_dump({"kind": "capture", **config.to_dict()}))
    return ["capture", "--config", str(job_file), "--quiet"]


@dataclass(frozen=True)
class CrashOutcome:
    """What one kill-then-resume trial found (``identical``: the resumed store equals the reference byte for byte)."""

    fault: str
    killed: bool
    recorded_sound: bool
    identical: bool
    lost: int
    duplicated: int


def crash_trial(config, out: Path, job: Path, *, spec: str | None = None, after_events: int | None = None) -> CrashOutcome:
    """Kill a CLI capture of ``config`` into ``out`` (at fault ``spec``, or from outside after ``after_events``
    trace lines), check what it recorded, resume in this process, and compare with ``config.store.path``."""
    from ..capture import capture
    from ..store import verify_store

    args = job_args(config.with_overrides({"store.path": str(out)}), job)
    if spec is not None:
        killed = run_with_fault(args, spec).returncode == -signal.SIGKILL
    else:
        killed = kill_after_events(args, after_events) is not None
    sound = verify_store(out).ok if (out / "manifest.json").exists() else not any(out.rglob("shards/*.arrow"))
    capture(config.with_overrides({"store.path": str(out)}), progress=False)
    lost, duplicated = lost_and_duplicated(out, config.store.path)
    return CrashOutcome(fault=spec or f"external after {after_events} events", killed=killed, recorded_sound=sound,
                        identical=tree_bytes(out) == tree_bytes(config.store.path), lost=lost, duplicated=duplicated)
