"""Shared by the benchmark scripts: where results go, the provenance of a row, timing, CSV files
with one row schema each, and the figure boilerplate.

Every script names its CSV columns once (``COLUMNS``, provenance first) and appends through
:class:`ResultsFile`, which refuses a file whose header or a row whose keys differ from them.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROVENANCE = ("timestamp", "machine", "torch", "logitcache", "commit")

K = TypeVar("K", bound=Hashable)


# ---------------------------------------------------------------- provenance
def provenance() -> dict[str, str]:
    """Machine, versions, timestamp and git commit for a CSV row (the ``PROVENANCE`` columns)."""
    import torch

    from logitcache import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} ({os.cpu_count()} cpu{gpu})", "torch": torch.__version__,
            "logitcache": __version__, "commit": commit}


def machine_load() -> str:
    """``1/5/15-minute load averages`` of this machine (the benchmarks share it)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def print_row(row: Mapping[str, object]) -> None:
    """One ``key=value`` line of a result row, provenance left out."""
    print(" ".join(f"{k}={v}" for k, v in row.items() if k not in PROVENANCE), flush=True)


# ---------------------------------------------------------------- timing
def synchronize() -> None:
    """Wait for queued CUDA work, so a timer read after it measures the work (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def single_thread() -> None:
    """One torch intra-op thread and one pyarrow CPU/IO thread: per-process speed, comparable across machines."""
    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds one call ``fn(*args)`` takes, queued CUDA work included (its result is dropped)."""
    synchronize()
    start = time.perf_counter()
    fn(*args)
    synchronize()
    return time.perf_counter() - start


def interleave(cases: Mapping[K, Callable[[], float]], repeats: int, *, warmup: bool = True) -> dict[K, list[float]]:
    """Seconds of each case over ``repeats`` rounds that run every case in turn (a, b, a, b, …), so
    drift on a shared machine hits all cases alike. Each case returns the seconds it measured
    (``partial(timed, fn)``, or a time the work reports itself); with ``warmup`` one round first
    is run and dropped (caches, imports, worker pools)."""
    seconds: dict[K, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + int(warmup)):
        for name, case in cases.items():
            s = case()
            if round_ or not warmup:
                seconds[name].append(s)
    return seconds


# ---------------------------------------------------------------- arguments
def capture_arguments(ap: argparse.ArgumentParser) -> None:
    """The size of a capture measurement, shared by capture_speed.py and vllm_speed.py."""
    ap.add_argument("--tokens", type=int, default=8192, help="positions per measurement")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4104)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")


def csv_argument(ap: argparse.ArgumentParser, name: str) -> None:
    """``--csv``: the file rows are appended to; by default ``benchmarks/results/<name>``,
    wherever the script is run from."""
    ap.add_argument("--csv", type=Path, default=RESULTS / name,
                    help=f"append result rows to this CSV file (default: benchmarks/results/{name})")


# ---------------------------------------------------------------- CSV files, one schema each
def read_header(path: Path) -> tuple[str, ...]:
    with open(path, newline="") as f:
        return tuple(next(csv.reader(f), ()))


class ResultsFile:
    """A CSV file whose rows all have ``columns``. Opening it refuses an existing file with another
    header (so a long run fails before it starts, not after); :meth:`append` refuses rows with
    other keys."""

    def __init__(self, path: Path, columns: Iterable[str]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self._check_header()

    def _check_header(self) -> None:
        if not self.path.exists():
            return
        found = read_header(self.path)
        if found != self.columns:
            raise ValueError(
                f"{self.path}: its header has columns {list(found)}; this script writes {list(self.columns)}"
                f"{_difference(self.columns, found)}. Write to a new file (--csv another.csv), or rewrite "
                f"this one under the new header (empty cells where a column was not measured).")

    def append(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append ``rows`` (each with exactly ``columns`` as keys); writes the header when the file is new."""
        rows = list(rows)
        for i, row in enumerate(rows):
            if set(row) != set(self.columns):
                raise ValueError(f"{self.path}: row {i} has columns {list(row)}; the file's schema is "
                                 f"{list(self.columns)}{_difference(self.columns, tuple(row))}. Fix the row "
                                 f"or the script's COLUMNS (and then write to a new file).")
        self._check_header()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                w.writeheader()
            w.writerows(rows)


def _difference(expected: tuple[str, ...], found: tuple[str, ...]) -> str:
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    if not missing and not extra:
        return " (the same columns in another order)"
    parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
    return f" ({', '.join(parts)})"


# ---------------------------------------------------------------- figures
def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating its folder) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
