"""Time each sparsifier on [4096, V] logits fed in chunks of 256 rows, against a logsumexp-only baseline.

    python benchmarks/sparsify_speed.py [--real] [--threads N] [--repeats R] [--csv other.csv]

``--real`` uses logits of the SmolLM2-135M directory at ``--model`` (default: the embedded teacher, converted on first use) on the
built-in pydoc corpus, and also times that bf16 forward, so the table shows what share of a capture
step each method costs. Otherwise logits are ``N(0, 9)`` with one +8 spike and a few +4 bumps per row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import PROVENANCE, ResultsFile, csv_argument, provenance, synchronize, timed

import torch

from logitcache.capture.sparsify import draw_uniforms, hybrid, sample, topk

COLUMNS = PROVENANCE + ("method", "dtype", "positions", "seconds", "positions_per_s")


def synthetic_logits(t: int, v: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, v, generator=g) * 3
    x[torch.arange(t), torch.randint(0, v, (t,), generator=g)] += 8
    bumps = torch.randint(0, v, (t, 8), generator=g)
    x.scatter_add_(1, bumps, torch.full((t, 8), 4.0))
    return x


def real_logits(model_dir: str, t: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """``(fp32 logits [t, V], seconds of the bf16 forward)`` from a local HF model on pydoc text."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(device)
    ids = tok("\n\n".join(topics.values()), return_tensors="pt").input_ids[0][: t]
    batch = ids.reshape(-1, 512).to(device)
    with torch.inference_mode():
        model(batch[:1])
        synchronize()
        start = time.perf_counter()
        logits = model(batch).logits
        synchronize()
        seconds = time.perf_counter() - start
    return logits.reshape(t, -1).float(), seconds


def time_method(fn, x: torch.Tensor, u: torch.Tensor, chunk: int, repeats: int) -> float:
    """Median seconds to run ``fn`` over all rows of ``x`` in ``chunk``-row pieces."""

    def all_chunks() -> None:
        for a in range(0, x.shape[0], chunk):
            fn(x[a : a + chunk], u[a : a + chunk])

    fn(x[:chunk], u[:chunk])  # warm-up
    return statistics.median(timed(all_chunks) for _ in range(repeats))


METHODS = {
    "logsumexp (baseline)": lambda x, u: torch.logsumexp(x.float(), -1),
    "topk k=64": lambda x, u: topk(x, 64),
    "sample N=50": lambda x, u: sample(x, 50, 1.0, u),
    "sample N=50 tau=0.8": lambda x, u: sample(x, 50, 0.8, u),
    "hybrid k=8 N=50": lambda x, u: hybrid(x, 8, 50, u),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv_argument(ap, "sparsify_speed.csv")
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--real", action="store_true", help="use real SmolLM2 logits from --model")
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded teacher)")
    ap.add_argument("--device", default="cpu", help="where the logits and sparsifiers run: cpu or cuda")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    if args.threads:
        torch.set_num_threads(args.threads)
    forward_s = None
    if args.real and args.model is None:
        from logitcache.capture.teachers import resolve_teacher_path

        args.model = str(resolve_teacher_path("embedded:smollm2-135m-instruct"))
    if args.real and os.path.isdir(args.model):
        x, forward_s = real_logits(args.model, args.positions, torch.device(args.device))
    else:
        x = synthetic_logits(args.positions, args.vocab)
    u = draw_uniforms(0, 0, x.shape[0], 50)
    rows = []
    print(f"{x.shape[0]} x {x.shape[1]} logits, chunks of {args.chunk}, {torch.get_num_threads()} threads"
          + (f", bf16 forward {forward_s:.2f} s" if forward_s else ""))
    print(f"{'method':24s} {'dtype':9s} {'seconds':>8s} {'pos/s':>10s} {'vs lse':>7s}"
          + (f" {'% of fwd':>8s}" if forward_s else ""))
    device = torch.device(args.device)
    meta = provenance()
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(device=device, dtype=dtype)
        base = None
        for name, fn in METHODS.items():
            sec = time_method(fn, xd, u, args.chunk, args.repeats)
            base = base or sec
            pps = x.shape[0] / sec
            extra = f" {100 * sec / forward_s:7.1f}%" if forward_s else ""
            print(f"{name:24s} {str(dtype)[6:]:9s} {sec:8.3f} {pps:10.0f} {base / sec:7.2f}{extra}", flush=True)
            rows.append({**meta, "method": name, "dtype": str(dtype)[6:], "positions": x.shape[0],
                         "seconds": f"{sec:.4f}", "positions_per_s": f"{pps:.1f}"})
    out.append(rows)


if __name__ == "__main__":
    main()
