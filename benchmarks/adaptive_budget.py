"""Adaptive sample budgets against fixed N at equal bytes per position, on held-out pydoc (SmolLM2-135M teacher).

``--sample-allocation variance`` spends a sequence's ``N·T`` draws where they remove the most variance
(``N_t ∝ sqrt(1 − Σp²)``, docs/capture.md). A confident position then draws little (few distinct ids)
and a broad one much (many distinct ids), so at the same mean N the adaptive store holds more distinct ids
and costs more bytes. The comparison is therefore at equal bytes **as the store encodes them**
(``kd_common.bytes_per_position``, the per-position N column included): for each fixed N, the adaptive mean
N' whose stored bytes come closest to fixed N's. Per pair, from the same teacher logits and with the
estimators benchmark's measurements (benchmarks/estimators.py): the summed variance ``mean_pos Σ_i Var(t̂_i)``
(= that of the logit gradient ``p − t̂``) over ``--seeds`` sampling seeds and its closed form, and the angle
of the summed head gradient to full KD's (fixed student, mean ± sd over ``--grad-seeds``).

    python benchmarks/adaptive_budget.py            # 256 positions, ~3 min; rows: benchmarks/results/adaptive_budget.csv
    python benchmarks/adaptive_budget.py --quick    # 128 positions, 8 seeds
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from common import PROVENANCE, ResultsFile, csv_argument, machine_load, provenance
from estimators import GRADIENTS, STATISTICS, Method, fixed_student, gradient_stats, make_targets, window_stats
from kd_common import bytes_per_position, corpus_plan, heldout_windows, load_cached_teacher, shard_spec

from logitcache.train.losses import full_kd_loss

COLUMNS = PROVENANCE + ("wall_s", "load", "method", "allocation", "k", "samples", "positions", "seeds", "grad_seeds",
                        "student_temperature", "bytes_per_position", "ids_per_position", *STATISTICS, *GRADIENTS)
FIXED = [("sample", 0, 12), ("sample", 0, 50), ("hybrid", 12, 50)]


def stored_bytes(m: Method, data: dict) -> float:
    spec = shard_spec(m.method, m.k, m.samples)
    if m.allocation != "fixed":
        spec = replace(spec, encoding=replace(spec.encoding, sample_totals=True))
    targets = [make_targets(m, lg, 0, sid) for lg, sid in zip(data["logits"], data["seq_ids"])]
    return bytes_per_position(spec, data["seq_ids"], data["tokens"], targets)


def matching_adaptive(fixed: Method, data: dict) -> Method:
    """The adaptive method whose stored bytes/position are closest to ``fixed``'s (integer mean N, bisection:
    bytes grow with N)."""
    goal = stored_bytes(fixed, data)
    lo, hi = 1, fixed.samples
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if stored_bytes(replace(fixed, samples=mid, allocation="variance"), data) < goal else \
            (lo, mid)
    near = [replace(fixed, samples=n, allocation="variance") for n in {max(1, lo - 1), lo}]
    return min(near, key=lambda m: abs(stored_bytes(m, data) - goal))


def load(args) -> dict:
    teacher = load_cached_teacher()
    plan = corpus_plan(teacher, args.seq_len)
    idx = heldout_windows(plan, args.windows)
    windows = torch.from_numpy(plan.windows(idx.start, idx.stop)).long()
    logits = list(teacher.logits(windows[:, :-1]))
    z, params = fixed_student(teacher, windows, args.student_temperature)
    full_grads = torch.autograd.grad(full_kd_loss(z, torch.stack(logits)), [z, *params], retain_graph=True)
    return {"windows": windows, "seq_ids": [plan.seq_id(i) for i in idx], "logits": logits, "z": z,
            "params": params, "tokens": [w.numpy() for w in windows], "full": (full_grads[0], list(full_grads[1:])),
            "teacher_probs": torch.softmax(torch.stack(logits).double(), -1),
            "probs": torch.softmax(z.detach().double(), -1)}


def measure(m: Method, data: dict, args) -> dict:
    stats = [window_stats(m, lg, t, p, sid, args.seeds)
             for lg, t, p, sid in zip(data["logits"], data["teacher_probs"], data["probs"], data["seq_ids"])]
    agg = {key: float(torch.cat([s[key] for s in stats]).mean()) for key in stats[0]}
    grads = gradient_stats(m, data["z"], data["params"], data["windows"], data["seq_ids"], data["logits"],
                           data["full"], args.grad_seeds)
    return {"method": m.name, "allocation": m.allocation, "k": m.k, "samples": m.samples,
            "positions": len(data["seq_ids"]) * args.seq_len, "seeds": args.seeds, "grad_seeds": args.grad_seeds,
            "student_temperature": args.student_temperature, "bytes_per_position": round(stored_bytes(m, data), 2),
            "ids_per_position": round(agg["ids"], 2), **{key: round(agg[key], 6) for key in STATISTICS},
            **{key: round(value, 4) for key, value in grads.items()}}


def run(args) -> list[dict]:
    started = time.perf_counter()
    torch.manual_seed(0)
    data = load(args)
    rows = []
    for method, k, n in FIXED:
        fixed = Method(f"{method} k={k} N={n}" if k else f"RS N={n}", method, "sparse", k=k, samples=n)
        matched = matching_adaptive(fixed, data)
        for m in (fixed, replace(matched, name=f"{fixed.name} → adaptive N={matched.samples}")):
            row = measure(m, data, args)
            rows.append(row)
            print(f"{m.name:>34}: {row['bytes_per_position']:6.1f} B/pos {row['ids_per_position']:5.1f} ids  "
                  f"Σvar {row['variance']:.5f} (theory {row['var_theory']:.5f})  angle {row['grad_angle_deg']:.2f}° "
                  f"± {row['grad_angle_sd']:.2f}  logit angle {row['logit_angle_deg']:.1f}°", flush=True)
    meta = {**provenance(), "wall_s": round(time.perf_counter() - started, 1), "load": machine_load()}
    return [{**meta, **row} for row in rows]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 window, 8 seeds, 2 gradient seeds")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows of --seq-len positions")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=12, help="sampling seeds for the variance")
    ap.add_argument("--grad-seeds", type=int, default=3, help="sampling seeds for the gradient angle")
    ap.add_argument("--student-temperature", type=float, default=2.0)
    csv_argument(ap, "adaptive_budget.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.windows, args.seeds, args.grad_seeds = 1, 8, 2
    rows = run(args)
    ResultsFile(args.csv, COLUMNS).append(rows)
    print(f"wall {rows[0]['wall_s']} s, load {rows[0]['load']}")


if __name__ == "__main__":
    main()
