"""RS-KD loss forward+backward time and peak memory ÷ cross-entropy's, on the same logits, in one run.

Cases (B = 1, one sequence of T positions, RS-KD targets with N = 50 draws, U ≈ 12 ids):

* ``ce``          — ``F.cross_entropy(logits, labels)`` forward + backward (the baseline);
* ``rskd``        — ``kd_loss(..., alpha=1, kind="sparse")`` (KD only);
* ``rskd+ce``     — ``kd_loss(..., alpha=0.5)`` (what a trainer runs);
* ``rskd_compiled``, ``rskd+ce_compiled`` — the same with ``impl="compiled"`` (torch.compile);
* all of these on bf16 logits too (``*_bf16``, ``*_bf16_compiled``; ratios against ``ce_bf16``);
* ``head_plain``  — ``kd_loss(hidden @ W.T, alpha=0.5)`` from hidden states,
  ``head_chunked`` — :func:`chunked_kd_loss` on the same inputs, ``head_fused`` — the same with
  ``impl="compiled"``, and ``head_liger`` — Liger-Kernel's fused linear cross-entropy (CE only;
  run only where ``liger_kernel`` imports, i.e. on a GPU with it installed). Ratios against
  ``head_plain``; ``head_fused`` against ``head_liger`` where that ran. ``*_bf16`` variants take
  bf16 hidden states and head.

Every case runs in a fresh subprocess. Peak memory is the growth over the state right after the
warm-up call (so a compile's own memory is not counted): on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the kernel's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; ``ru_maxrss``
where that is not possible), with glibc's mmap threshold pinned at 64 KiB so freed tensors leave
RSS. Time is the minimum of ``--repeats`` runs after one warm-up (the minimum, because the machine
may be shared: contention only ever adds time). ``--device`` picks the device (default: CUDA where
available), so the same command runs on a GPU machine unchanged.

    python benchmarks/loss_speed.py          # appends to benchmarks/results/loss_speed.csv
    python benchmarks/loss_speed.py --device cuda --csv benchmarks/results/loss_speed_gpu.csv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PROVENANCE, ResultsFile, csv_argument, provenance, timed

CASES = ("ce", "rskd", "rskd+ce", "rskd_compiled", "rskd+ce_compiled",
         "ce_bf16", "rskd_bf16", "rskd+ce_bf16", "rskd_bf16_compiled", "rskd+ce_bf16_compiled",
         "head_plain", "head_chunked", "head_fused", "head_liger")
COLUMNS = PROVENANCE + ("case", "V", "T", "U", "mean_ids", "seconds", "peak_bytes", "baseline", "ratio", "peak_ratio")


# ---------------------------------------------------------------- worker (one case per process)
def _rskd_batch(t: int, v: int, n: int, gen: torch.Generator) -> dict:
    """A collated RS-KD batch without a dense teacher: per position 64 random candidate ids with
    Zipf-like probabilities (rank^-1.7), so N = 50 draws keep ≈ 12 distinct ids as in the paper."""
    from logitcache.train.collate import collate
    from logitcache.targets import SparseTargets

    cand = torch.randint(0, v, (t, 64), generator=gen)
    q = torch.arange(1, 65, dtype=torch.float32) ** -1.7 * torch.exp(0.3 * torch.randn(t, 64, generator=gen))
    draws = torch.multinomial(q, n, replacement=True, generator=gen)
    counts = torch.zeros(t, 64, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    ids = torch.where(counts > 0, cand, v)  # merge duplicate candidates: sort ids, then run-length
    sorted_ids, order = ids.sort(-1)
    sorted_counts = counts.gather(1, order)
    rows = torch.arange(t)[:, None].expand(t, 64)
    keep = sorted_ids < v
    flat_pos, flat_ids, flat_counts = rows[keep], sorted_ids[keep], sorted_counts[keep]
    key = flat_pos * v + flat_ids
    uniq, inverse = torch.unique_consecutive(key, return_inverse=True)
    merged = torch.zeros(uniq.numel(), dtype=torch.int64).scatter_add_(0, inverse, flat_counts)
    pos = uniq // v
    targets = SparseTargets(
        method="sample", sample_lengths=torch.bincount(pos, minlength=t).to(torch.int32),
        sample_ids=(uniq % v).to(torch.int32), sample_counts=merged.to(torch.int32), num_samples=n,
    )
    labels = torch.randint(0, v, (t,), generator=gen)
    return collate([{"seq_id": 0, "input_ids": labels, "labels": labels, "targets": targets}])


def _peak_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_read(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def baselines(case: str) -> tuple[str, ...]:
    """The cases ``case`` is divided by, in order of preference (the first one that ran)."""
    bf16 = "_bf16" if "_bf16" in case else ""
    if not case.startswith("head"):
        return (f"ce{bf16}",)
    return (f"head_liger{bf16}", f"head_plain{bf16}") if case.startswith("head_fused") else (f"head_plain{bf16}",)


def _head_step(name: str, batch: dict, h: torch.Tensor, w: torch.Tensor, chunk: int):
    """forward + backward of head case ``name`` on ``hidden h [1,T,d]`` and ``head w [V,d]``; ``None``
    where the case cannot run here (Liger not importable)."""
    from logitcache.train.losses import kd_loss
    from logitcache.train.losses_chunked import chunked_kd_loss

    if name == "head_liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        liger, labels = LigerFusedLinearCrossEntropyLoss(), batch["labels"].view(-1)
        return lambda: torch.autograd.grad(liger(w, h.view(-1, h.shape[-1]), labels), (h, w))
    if name == "head_plain":
        return lambda: torch.autograd.grad(kd_loss(h @ w.T, batch, alpha=0.5), (h, w))
    impl = "compiled" if name == "head_fused" else "plain"
    return lambda: torch.autograd.grad(chunked_kd_loss(h, w, batch, alpha=0.5, chunk_size=chunk, impl=impl), (h, w))


def run_case(case: str, v: int, t: int, n: int, hidden: int, chunk: int, repeats: int, device: str) -> dict | None:
    from logitcache.train.losses import kd_loss

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    batch = {k: x.to(device) if isinstance(x, torch.Tensor) else x for k, x in _rskd_batch(t, v, n, gen).items()}
    name = case.removesuffix("_compiled")
    impl = "compiled" if name != case else "plain"
    dtype = torch.bfloat16 if name.endswith("_bf16") else torch.float32
    name = name.removesuffix("_bf16")
    if name.startswith("head"):
        h = torch.randn(1, t, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        w = (torch.randn(v, hidden, generator=gen) / hidden**0.5).to(device=device, dtype=dtype).requires_grad_(True)
        step = _head_step(name, batch, h, w, chunk)
        if step is None:
            return None
    else:
        z = torch.randn(1, t, v, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        labels = batch["labels"]
        if name == "ce":
            def step():
                return torch.autograd.grad(F.cross_entropy(z.view(-1, v), labels.view(-1)), z)
        else:
            alpha = 1.0 if name == "rskd" else 0.5
            def step():
                return torch.autograd.grad(kd_loss(z, batch, alpha=alpha, kind="sparse", impl=impl), z)
    timed(step)  # warm-up (and compile)
    base = _peak_reset(device)
    seconds = min(timed(step) for _ in range(repeats))
    return {"seconds": seconds, "peak_bytes": _peak_read(device) - base,
            "U": int(batch["target_ids"].shape[-1]), "mean_ids": float(batch["target_mask"].sum()) / t}


# ---------------------------------------------------------------- driver
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    csv_argument(ap, "loss_speed.csv")
    ap.add_argument("--vocab", default="49152,152064", help="comma-separated vocabulary sizes")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=128, help="hidden size for the head_* cases")
    ap.add_argument("--chunk", type=int, default=256, help="positions per chunk for head_chunked")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        v = int(args.vocab)
        print(json.dumps(run_case(args.worker, v, args.seq, args.samples, args.hidden, args.chunk, args.repeats,
                                  args.device)))
        return
    out = ResultsFile(args.csv, COLUMNS)
    rows = []
    meta = provenance()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for v in (int(x) for x in args.vocab.split(",")):
        results = {}
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--worker", case, "--vocab", str(v), "--seq", str(args.seq),
                   "--samples", str(args.samples), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                   "--repeats", str(args.repeats), "--device", args.device]
            # the worker's stderr goes to ours: a case that crashes shows why
            stdout = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
            result = json.loads(stdout.strip().splitlines()[-1])
            if result is not None:  # None: the case cannot run here (head_liger without liger_kernel)
                results[case] = result
        for case, r in results.items():
            name = next((b for b in baselines(case) if b in results), "")
            base = results.get(name)
            rows.append({
                **meta, "case": case, "V": v, "T": args.seq, "U": r["U"],
                "mean_ids": round(r["mean_ids"], 2), "seconds": round(r["seconds"], 4),
                "peak_bytes": r["peak_bytes"], "baseline": name,
                "ratio": round(r["seconds"] / base["seconds"], 3) if base else "",
                "peak_ratio": round(r["peak_bytes"] / base["peak_bytes"], 3) if base and base["peak_bytes"] else "",
            })
    out.append(rows)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'case':>22} {'V':>7} {'T':>5} {'U':>3} {'ids':>5} {'seconds':>8} {'peak MiB':>9} {'vs':>11} {'time×':>6} {'peak×':>6}")
    for r in rows:
        print(f"{r['case']:>22} {r['V']:>7} {r['T']:>5} {r['U']:>3} {r['mean_ids']:>5} {r['seconds']:>8.3f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['baseline']:>11} {r['ratio']!s:>6} {r['peak_ratio']!s:>6}")


if __name__ == "__main__":
    main()
