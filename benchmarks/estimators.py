"""Sparse-target estimators against the full teacher distribution, on a held-out slice of pydoc.

For every method, from the *same* teacher logits (SmolLM2-135M-Instruct, bf16, the last windows
of builtin:pydoc):

* ``bytes/pos`` — the targets of all positions as one shard from the store's encoder
  (``kd_common.bytes_per_position``; the token column included), and mean ``ids/pos``;
* bias — ``bias_tv = mean_pos ½‖E_S[t̂] − t‖₁`` with ``E_S`` the mean over ``S`` sampling seeds
  (also at ``S/4`` seeds: an unbiased estimator's value keeps shrinking with ``S``, a biased
  one's does not), and ``tv_single`` the mean ½‖t̂ − t‖₁ of one draw. For ``topk`` the target is
  the renormalised head; for ``+ghost`` it is the effective target of the ghost loss for the
  fixed student below (head exact, tail mass spread in the student's proportions).
  (KL(t ‖ E[t̂]) is +∞ for every method here — E over finitely many seeds leaves ids at 0 — so the
  bias is reported in total variation);
* ``variance`` — ``mean_pos Σ_i Var_seeds(t̂_i)``; ``var_theory`` is the closed form
  ``(1 − Σt²)/N`` (sample) or ``m²(1 − Σ_tail (t/m)²)/N`` (hybrid), a check on the measurement;
* gradient fidelity — for a fixed student ``p = softmax(h Wᵀ / τ_s)`` (the teacher's own final
  hidden states ``h`` and a trainable copy ``W`` of its output head, ``τ_s = --student-temperature``:
  an under-confident student near the teacher), the gradient with respect to ``W`` of the method's KD
  loss (``logitcache.kd_loss``, α = 1) summed over the whole batch of positions, against the
  full-KD gradient (``full_kd_loss`` on the teacher logits): angle (degrees) and norm ratio, mean ±
  sd over ``--grad-seeds`` sampling seeds; ``logit_angle`` is the mean per-position angle of the
  gradients with respect to the logits (no averaging over positions).

    python benchmarks/estimators.py --png docs/img/estimators.png   # rows: results/estimators.csv
    python benchmarks/estimators.py --quick     # 512 positions, 8 seeds: a few minutes
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import PROVENANCE, ResultsFile, csv_argument, machine_load, provenance, pyplot, save_figure
from kd_common import (bytes_per_position, command_line, corpus_plan, heldout_windows, load_cached_teacher,
                       markdown_table, shard_spec, update_results_md)

from logitcache.train.collate import collate
from logitcache.capture.config import SparsifyConfig
from logitcache.train.losses import full_kd_loss, kd_loss
from logitcache.train.metrics import ghost_effective_target, gradient_angle, norm_ratio
from logitcache.capture.budget import sequence_targets
from logitcache.capture.sparsify import draw_uniforms, sparsify
from logitcache.targets import SparseTargets

STATISTICS = ("bias_tv", "bias_tv_quarter", "tv_single", "variance", "var_theory")
GRADIENTS = ("grad_angle_deg", "grad_angle_sd", "norm_ratio", "norm_ratio_sd", "logit_angle_deg")
COLUMNS = PROVENANCE + ("wall_s", "load", "method", "sparsifier", "loss_kind", "k", "samples", "positions", "seeds",
                        "grad_seeds", "student_temperature", "bytes_per_position", "ids_per_position",
                        *STATISTICS, *GRADIENTS)


@dataclass(frozen=True)
class Method:
    name: str
    method: str  # sparsifier
    kind: str  # loss kind
    k: int = 0
    samples: int = 0
    allocation: str = "fixed"  # or "variance": an adaptive budget of mean `samples` (benchmarks/adaptive_budget.py)

    @property
    def stochastic(self) -> bool:
        return self.samples > 0


def methods() -> list[Method]:
    out = [Method(f"topk {k}", "topk", "topk_renorm", k=k) for k in (5, 12, 25, 50, 100)]
    out += [Method(f"topk {k} + ghost", "topk", "ghost", k=k) for k in (5, 12, 25, 50, 100)]
    out += [Method(f"RS N={n}", "sample", "sparse", samples=n) for n in (10, 50, 150, 600)]
    out += [Method(f"hybrid k={k} N={n}", "hybrid", "sparse", k=k, samples=n) for k, n in ((4, 20), (12, 50), (25, 150))]
    return out


def make_targets(m: Method, logits: torch.Tensor, seed: int, seq_id: int) -> SparseTargets:
    """The targets of one window as a capture of it writes them (an adaptive budget spread over the window)."""
    cfg = SparsifyConfig(method=m.method, k=max(m.k, 1), samples=max(m.samples, 1), allocation=m.allocation)
    u = draw_uniforms(seed, seq_id, logits.shape[0], cfg.max_samples) if m.stochastic else None
    return sequence_targets([sparsify(logits, cfg, u)], cfg.samples)


def sparse_target(m: Method, tg: SparseTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, ids, probs float64)`` of the target the loss uses (renormalised head for topk)."""
    offsets, ids, probs = tg.estimate()
    rows = torch.repeat_interleave(torch.arange(tg.num_positions), offsets[1:] - offsets[:-1])
    probs = probs.double()
    if m.kind == "topk_renorm":
        total = torch.zeros(tg.num_positions, dtype=torch.float64).index_add_(0, rows, probs)
        probs = probs / total[rows]
    return rows, ids, probs


def theory_variance(m: Method, t: torch.Tensor, tg: SparseTargets) -> torch.Tensor:
    """``float64[T]`` closed-form ``Σ_i Var(t̂_i)`` (0 for deterministic methods), over each position's own N."""
    draws = m.samples if tg.sample_totals is None else tg.sample_totals.double()
    if m.method == "sample":
        return (1 - (t * t).sum(1)) / draws
    if m.method == "hybrid":
        mass = tg.tail_mass.double()
        tail = t.scatter(1, tg.head_ids.long(), 0.0)
        return (mass * mass - (tail * tail).sum(1)) / draws
    return torch.zeros(t.shape[0], dtype=torch.float64)


def window_stats(m: Method, logits: torch.Tensor, t: torch.Tensor, p: torch.Tensor, seq_id: int,
                 seeds: int) -> dict[str, torch.Tensor]:
    """Per-position bias/variance statistics of one window: teacher ``logits`` [T, V], its
    probabilities ``t`` and the fixed student's ``p`` (float64[T, V])."""
    n, v = t.shape
    if not m.stochastic:
        tg = make_targets(m, logits, 0, seq_id)
        if m.kind == "ghost":
            y = ghost_effective_target(tg, p)
        else:
            y = torch.zeros(n, v, dtype=torch.float64)
            rows, ids, probs = sparse_target(m, tg)
            y[rows, ids] = probs
        tv = 0.5 * (y - t).abs().sum(1)
        zero = torch.zeros(n, dtype=torch.float64)
        return {"bias_tv": tv, "bias_tv_quarter": tv, "tv_single": tv, "variance": zero,
                "var_theory": zero, "ids": tg.ids_per_position().double()}
    acc = torch.zeros(n, v, dtype=torch.float64)
    sumsq, single = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    quarter = max(1, seeds // 4)
    out: dict[str, torch.Tensor] = {"ids": torch.zeros(n, dtype=torch.float64)}
    for s in range(seeds):
        tg = make_targets(m, logits, s, seq_id)
        rows, ids, probs = sparse_target(m, tg)
        acc.index_put_((rows, ids), probs, accumulate=True)
        sumsq.index_add_(0, rows, probs * probs)
        t_at = t[rows, ids]
        covered = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, t_at)
        single += 0.5 * (torch.zeros(n, dtype=torch.float64).index_add_(0, rows, (probs - t_at).abs()) + 1 - covered)
        out["ids"] += tg.ids_per_position().double() / seeds
        if s + 1 == quarter:
            out["bias_tv_quarter"] = 0.5 * (acc / quarter - t).abs().sum(1)
            out["var_theory"] = theory_variance(m, t, tg)
    mean = acc / seeds
    out["bias_tv"] = 0.5 * (mean - t).abs().sum(1)
    out["tv_single"] = single / seeds
    out["variance"] = (sumsq / seeds - (mean * mean).sum(1)) * seeds / max(seeds - 1, 1)
    return out


def gradient_stats(m: Method, z: torch.Tensor, params: list, windows: torch.Tensor, seq_ids: list[int],
                   logits: list[torch.Tensor], full: tuple, grad_seeds: int) -> dict[str, float]:
    """Angle and norm ratio of the method's parameter gradient to the full-KD one (mean ± sd over seeds)."""
    angles, ratios, logit_angles = [], [], []
    for s in range(grad_seeds if m.stochastic else 1):
        items = [{"seq_id": sid, "input_ids": w[:-1], "labels": w[1:], "targets": make_targets(m, lg, s, sid)}
                 for sid, w, lg in zip(seq_ids, windows, logits)]
        loss = kd_loss(z, collate(items), alpha=1.0, kind=m.kind)
        gz, *gp = torch.autograd.grad(loss, [z, *params], retain_graph=True)
        angles.append(gradient_angle(gp, full[1]))
        ratios.append(norm_ratio(gp, full[1]))
        cos = torch.nn.functional.cosine_similarity(gz.reshape(-1, gz.shape[-1]).double(),
                                                    full[0].reshape(-1, gz.shape[-1]).double(), dim=1)
        logit_angles.append(float(torch.rad2deg(torch.acos(cos.clamp(-1, 1))).mean()))
    sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return {"grad_angle_deg": statistics.mean(angles), "grad_angle_sd": sd(angles),
            "norm_ratio": statistics.mean(ratios), "norm_ratio_sd": sd(ratios),
            "logit_angle_deg": statistics.mean(logit_angles)}


def fixed_student(teacher, windows: torch.Tensor, temperature: float) -> tuple[torch.Tensor, list]:
    """Student logits ``z = h Wᵀ / τ`` ([W, T, V], with graph) and its parameters ``[W]``.

    ``h`` are the teacher's own final hidden states (frozen) and ``W`` a trainable fp32 copy of
    its output head: at ``τ > 1`` an under-confident student near the teacher, the regime where
    the tail of the target matters. The gradient compared is the one of ``W`` (the tied
    embedding, the largest parameter block of these models), summed over all positions.
    """
    hidden = teacher.hidden(windows[:, :-1]).float()
    weight = torch.nn.Parameter(teacher.head.weight.detach().float().clone())
    return hidden @ weight.T / temperature, [weight]


def run(args) -> list[dict]:
    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = load_cached_teacher()
    plan = corpus_plan(teacher, args.seq_len)
    idx = heldout_windows(plan, args.windows)
    windows = torch.from_numpy(plan.windows(idx.start, idx.stop)).long()
    seq_ids = [plan.seq_id(i) for i in idx]
    logits = list(teacher.logits(windows[:, :-1]))  # bf16 [T, V] per window
    z, params = fixed_student(teacher, windows, args.student_temperature)
    probs = torch.softmax(z.detach().double(), -1)
    teacher_probs = torch.softmax(torch.stack(logits).double(), -1)
    full_loss = full_kd_loss(z, torch.stack(logits))
    full_grads = torch.autograd.grad(full_loss, [z, *params], retain_graph=True)
    full = (full_grads[0], list(full_grads[1:]))
    print(f"{len(idx)} windows x {args.seq_len} positions; student KL(t||p) {float(full_loss.detach()):.3f} nats",
          flush=True)
    tokens = [w.numpy() for w in windows]
    rows = []
    for m in methods():
        t0 = time.perf_counter()
        stats = [window_stats(m, lg, t, p, sid, args.seeds)
                 for lg, t, p, sid in zip(logits, teacher_probs, probs, seq_ids)]
        agg = {key: float(torch.cat([s[key] for s in stats]).mean()) for key in stats[0]}
        seed0 = [make_targets(m, lg, 0, sid) for lg, sid in zip(logits, seq_ids)]
        nbytes = bytes_per_position(shard_spec(m.method, m.k, m.samples), seq_ids, tokens, seed0)
        grads = gradient_stats(m, z, params, windows, seq_ids, logits, full, args.grad_seeds)
        row = {"method": m.name, "sparsifier": m.method, "loss_kind": m.kind, "k": m.k, "samples": m.samples,
               "positions": len(idx) * args.seq_len, "seeds": args.seeds if m.stochastic else 1,
               "grad_seeds": args.grad_seeds if m.stochastic else 1, "student_temperature": args.student_temperature,
               "bytes_per_position": round(nbytes, 2), "ids_per_position": round(agg["ids"], 2),
               **{key: round(agg[key], 6) for key in STATISTICS},
               **{key: round(value, 4) for key, value in grads.items()}}
        rows.append(row)
        print(f"{m.name:>22}: {nbytes:7.1f} B/pos {agg['ids']:6.1f} ids  bias_tv {agg['bias_tv']:.4f} "
              f"(S/4 {agg['bias_tv_quarter']:.4f})  var {agg['variance']:.5f} (theory {agg['var_theory']:.5f})  "
              f"angle {grads['grad_angle_deg']:5.1f}°  ratio {grads['norm_ratio']:.2f}  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    wall = time.perf_counter() - started
    meta = {**provenance(), "wall_s": round(wall, 1), "load": machine_load()}
    return [{**meta, **row} for row in rows]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families = {"topk_renorm": "top-k renormalised", "ghost": "top-k + ghost", "sample": "RS-KD", "hybrid": "hybrid"}
    for key, label in families.items():
        sel = [r for r in rows if (r["loss_kind"] == key if key in ("topk_renorm", "ghost") else r["sparsifier"] == key)]
        x = [r["bytes_per_position"] for r in sel]
        axes[0].plot(x, [r["grad_angle_deg"] for r in sel], "o-", label=label)
        axes[1].plot(x, [r["bias_tv"] for r in sel], "o-", label=label)
    axes[0].set_ylabel("angle to full-KD parameter gradient (°)")
    axes[1].set_ylabel("bias: ½‖E[t̂] − t‖₁")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("bytes / position (store encoder)")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"Estimators on {rows[0]['positions']} held-out pydoc positions (SmolLM2-135M teacher)")
    save_figure(fig, path)


def results_section(rows: list[dict], command: str) -> str:
    r0 = rows[0]
    head = ["method", "bytes/pos", "ids/pos", "bias ½‖E[t̂]−t‖₁ (S/4 → S seeds)", "½‖t̂−t‖₁ one draw",
            "Σ Var(t̂) (theory)", "param-grad angle °", "norm ratio", "per-position logit angle °"]
    body = []
    for r in rows:
        pm = (lambda v, sd: f"{v:.1f} ± {sd:.1f}" if r["grad_seeds"] > 1 else f"{v:.1f}")
        pm2 = (lambda v, sd: f"{v:.2f} ± {sd:.2f}" if r["grad_seeds"] > 1 else f"{v:.2f}")
        bias = (f"{r['bias_tv_quarter']:.4f} → {r['bias_tv']:.4f}" if r["seeds"] > 1 else f"{r['bias_tv']:.4f}")
        var = f"{r['variance']:.5f} ({r['var_theory']:.5f})" if r["seeds"] > 1 else "0"
        body.append([r["method"], r["bytes_per_position"], r["ids_per_position"], bias, f"{r['tv_single']:.4f}", var,
                     pm(r["grad_angle_deg"], r["grad_angle_sd"]), pm2(r["norm_ratio"], r["norm_ratio_sd"]),
                     f"{r['logit_angle_deg']:.1f}"])
    return (f"Command: `{command}`\n\n"
            f"{r0['positions']} held-out positions, S = {max(r['seeds'] for r in rows)} sampling seeds, "
            f"{max(r['grad_seeds'] for r in rows)} gradient seeds, fixed student p = softmax(h Wᵀ / "
            f"{r0['student_temperature']}) on the teacher's hidden states h, gradient with respect to W. Run {r0['timestamp']}, commit {r0['commit']}, "
            f"{r0['machine']}, torch {r0['torch']}; wall {r0['wall_s']} s at load {r0['load']}.\n\n"
            + markdown_table(head, body))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 window (256 positions), 8 seeds, 1 gradient seed")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of --seq-len positions")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=32, help="sampling seeds for bias and variance")
    ap.add_argument("--grad-seeds", type=int, default=3, help="sampling seeds for the gradient comparison")
    ap.add_argument("--student-temperature", type=float, default=2.0,
                    help="the fixed student: the teacher's hidden states and head at this temperature")
    csv_argument(ap, "estimators.csv")
    ap.add_argument("--png", type=Path, default=None, help="draw angle and bias against bytes per position here")
    ap.add_argument("--results-md", action="store_true", help="replace the estimators table in docs/results.md")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    if args.quick:
        args.windows, args.seeds, args.grad_seeds = 1, 8, 1
    rows = run(args)
    out.append(rows)
    if args.png:
        plot(rows, args.png)
    if args.results_md:
        section = "estimators-quick" if args.quick else "estimators"
        update_results_md(section, results_section(rows, command_line()))
    print(f"wall {rows[0]['wall_s']} s, load {rows[0]['load']}")


if __name__ == "__main__":
    main()
