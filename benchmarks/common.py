"""Shared by the benchmark scripts: provenance of a row and appending rows to a CSV file."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def provenance() -> dict[str, str]:
    """Machine, versions, timestamp and git commit for a CSV row."""
    import torch

    from logitcache import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} ({os.cpu_count()} cpu{gpu})", "torch": torch.__version__,
            "logitcache": __version__, "commit": commit}


def synchronize() -> None:
    """Wait for queued CUDA work, so a timer read after it measures the work (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path``, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
