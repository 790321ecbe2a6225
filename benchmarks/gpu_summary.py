"""Issue #17's GPU ratios from the CSVs that ``gpu_suite.sh`` wrote into one folder.

Reads ``capture_speed_gpu.csv``, ``sparsify_speed_gpu.csv`` and ``loss_speed_gpu.csv`` where present (the
benchmarks' own columns; of rows repeating a case, the last) and prints, against the issue's targets:
capture ÷ bare forward per method (≥ 0.90), the row encoder's parts, the sparsifiers ÷ logsumexp, and each
loss case's time and peak memory ÷ its baseline (compiled loss ≤ 1.10× ``F.cross_entropy`` with peak ≤ 1.0×;
the fused-linear loss ≤ 1.10× Liger's fused linear cross-entropy).

    python benchmarks/gpu_summary.py bench-out/gpu
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

CAPTURE_TARGET, TIME_TARGET, PEAK_TARGET = 0.90, 1.10, 1.0


def latest(path: Path, key: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of ``path`` in file order, only the last of those sharing the ``key`` columns ([] if absent)."""
    if not path.is_file():
        print(f"({path.name}: not written)")
        return []
    with open(path, newline="") as f:
        rows = {tuple(row[k] for k in key): row for row in csv.DictReader(f)}
    return list(rows.values())


def table(title: str, header: tuple[str, ...], lines: list[tuple]) -> None:
    print(f"\n{title}\n| {' | '.join(header)} |\n|{'---|' * len(header)}")
    for line in lines:
        print(f"| {' | '.join(str(x) for x in line)} |")


def verdict(ok: bool) -> str:
    return "meets" if ok else "**misses**"


def capture(rows: list[dict[str, str]]) -> None:
    table(f"Capture ÷ bare teacher forward (target ≥ {CAPTURE_TARGET})",
          ("method", "encode threads", "bare positions/s", "capture positions/s", "capture ÷ bare", "target"),
          [(r["method"], r["encode_threads"], f"{float(r['bare_tok_s']):,.0f}", f"{float(r['capture_tok_s']):,.0f}",
            r["ratio"], verdict(float(r["ratio"]) >= CAPTURE_TARGET)) for r in rows])


def sparsify(rows: list[dict[str, str]]) -> None:
    kernels = [r for r in rows if not r["method"].startswith("encode ")]
    base = {r["dtype"]: float(r["seconds"]) for r in kernels if r["method"].startswith("logsumexp")}
    table("Sparsifiers (time ÷ one logsumexp pass over the same logits)",
          ("method", "dtype", "positions/s", "× logsumexp"),
          [(r["method"], r["dtype"], f"{float(r['positions_per_s']):,.0f}",
            f"{float(r['seconds']) / base[r['dtype']]:.2f}" if r["dtype"] in base else "") for r in kernels])
    parts: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["method"].startswith("encode "):
            name, part = r["method"].removeprefix("encode ").split(": ", 1)
            parts.setdefault(name, {})[part.split(" (")[0]] = float(r["seconds"]) / int(r["positions"])
    table("Row encoder, positions/s (device path = device streams + the rest on the CPU)",
          ("method", "numpy (CPU path)", "device streams", "rest on CPU", "device path", "÷ numpy time"),
          [(name, *(f"{1 / p[k]:,.0f}" for k in ("numpy", "device streams", "rest on CPU")),
            f"{1 / (p['device streams'] + p['rest on CPU']):,.0f}",
            f"{(p['device streams'] + p['rest on CPU']) / p['numpy']:.2f}") for name, p in parts.items()])


def loss_target(r: dict[str, str]) -> str:
    if not r["ratio"]:
        return ""
    time_ok = float(r["ratio"]) <= TIME_TARGET
    if r["case"].startswith("head_fused"):
        return verdict(time_ok) + " (vs Liger)" if r["baseline"].startswith("head_liger") else "no Liger here"
    if r["case"].endswith("_compiled"):
        return verdict(time_ok and r["peak_ratio"] != "" and float(r["peak_ratio"]) <= PEAK_TARGET)
    return ""


def loss(rows: list[dict[str, str]]) -> None:
    table(f"Losses, forward + backward (targets: compiled ≤ {TIME_TARGET}× time and ≤ {PEAK_TARGET}× peak of "
          f"cross-entropy; fused-linear ≤ {TIME_TARGET}× Liger)",
          ("case", "V", "T", "ms", "peak MiB", "vs", "time ×", "peak ×", "target"),
          [(r["case"], r["V"], r["T"], f"{1e3 * float(r['seconds']):.2f}", f"{int(r['peak_bytes']) / 2**20:,.1f}",
            r["baseline"], r["ratio"], r["peak_ratio"], loss_target(r)) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="where gpu_suite.sh wrote its CSVs ($OUT)")
    folder = ap.parse_args().folder
    runs = {"capture": latest(folder / "capture_speed_gpu.csv", ("method", "encode_threads")),
            "sparsify": latest(folder / "sparsify_speed_gpu.csv", ("method", "dtype")),
            "loss": latest(folder / "loss_speed_gpu.csv", ("case", "V", "T"))}
    for name, rows in runs.items():
        if rows:
            print(f"{name}: {rows[-1]['machine']}, torch {rows[-1]['torch']}, {rows[-1]['timestamp']}")
    capture(runs["capture"])
    sparsify(runs["sparsify"])
    loss(runs["loss"])


if __name__ == "__main__":
    main()
