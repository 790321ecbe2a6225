"""Time each sparsifier on [4096, V] logits fed in chunks of 256 rows, against a logsumexp-only baseline.

    python benchmarks/sparsify_speed.py [--real] [--threads N] [--repeats R] [--encode] [--csv other.csv]

``--real`` uses logits of the SmolLM2-135M directory at ``--model`` (default: the embedded teacher, converted on first use) on the
built-in pydoc corpus, and also times that bf16 forward, so the table shows what share of a capture
step each method costs. Otherwise logits are ``N(0, 9)`` with one +8 spike and a few +4 bumps per row.

``--encode`` also times the row encoder on each method's targets (rows of 512 positions, one unit, rank-delta,
float32, zstd-9 Arrow; labels: the text's next tokens with ``--real``, else the argmax at 60% of positions): the
numpy path (what a CPU capture runs), and the device path in its two parts, the batched streams on ``--device``
(``encode_device.unit_streams``, transfer included) and what is left on the CPU (byte columns and container).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import PROVENANCE, ResultsFile, csv_argument, provenance, synchronize, timed

import numpy as np
import torch

from logitcache.capture.sparsify import draw_uniforms, hybrid, sample, topk
from logitcache.store.containers import get_container
from logitcache.store.encode_device import unit_streams
from logitcache.store.encoding import Encoding, corpus_order, encode_row, row_labels
from logitcache.store.spec import ShardSpec

COLUMNS = PROVENANCE + ("method", "dtype", "positions", "seconds", "positions_per_s")


def synthetic_logits(t: int, v: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, v, generator=g) * 3
    x[torch.arange(t), torch.randint(0, v, (t,), generator=g)] += 8
    bumps = torch.randint(0, v, (t, 8), generator=g)
    x.scatter_add_(1, bumps, torch.full((t, 8), 4.0))
    return x


def real_logits(model_dir: str, t: int, device: torch.device) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``(fp32 logits [t, V], seconds of the bf16 forward, the t + 1 tokens)`` from a local HF model on pydoc text
    (each 512-token window's last logits predict the window's own last token: close enough for timing)."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(device)
    ids = tok("\n\n".join(topics.values()), return_tensors="pt").input_ids[0][: t + 1]
    batch = ids[:t].reshape(-1, 512).to(device)
    with torch.inference_mode():
        model(batch[:1])
        synchronize()
        start = time.perf_counter()
        logits = model(batch).logits
        synchronize()
        seconds = time.perf_counter() - start
    return logits.reshape(t, -1).float(), seconds, ids


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
    ap.add_argument("--encode", action="store_true", help="also time the row encoder (numpy path, device path)")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    if args.threads:
        torch.set_num_threads(args.threads)
    forward_s, tokens = None, None
    if args.real and args.model is None:
        from logitcache.capture.teachers import resolve_teacher_path

        args.model = str(resolve_teacher_path("embedded:smollm2-135m-instruct"))
    if args.real and os.path.isdir(args.model):
        x, forward_s, tokens = real_logits(args.model, args.positions, torch.device(args.device))
    else:
        x = synthetic_logits(args.positions, args.vocab)
    if tokens is None:
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, x.shape[1], (x.shape[0] + 1,), generator=g)
        tokens[1:] = torch.where(torch.rand(x.shape[0], generator=g) < 0.6, x.argmax(1).cpu(), tokens[1:])
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
    if args.encode:
        rows += encode_rows(x.to(device), tokens.numpy(), u, args.repeats, meta)
    out.append(rows)


ENCODED = ("topk k=64", "sample N=50", "hybrid k=8 N=50")
ROW = 512  # positions per encoded row


def encode_rows(x: torch.Tensor, tokens: np.ndarray, u: torch.Tensor, repeats: int, meta: dict) -> list[dict]:
    """Rows timing the numpy encode and the device path's two parts, per method (one unit of all rows)."""
    n = x.shape[0] // ROW * ROW
    enc = Encoding(ids="rank-delta", logprobs="float32", vocab_size=x.shape[1],
                   order=corpus_order(tokens, x.shape[1]))
    out = []
    for name in ENCODED:
        targets = [METHODS[name](x[a:a + ROW], u[a:a + ROW].to(x.device)) for a in range(0, n, ROW)]
        toks = [tokens[a:a + ROW + 1] for a in range(0, n, ROW)]
        cpu = [t.to("cpu") for t in targets]
        labels = [row_labels(tok, t, None) for tok, t in zip(toks, cpu)]
        spec = ShardSpec(method=name.split()[0], encoding=enc, k=cpu[0].head_ids.shape[1] if cpu[0].has_head else 0,
                         num_samples=50 if cpu[0].has_samples else 0, sequences_per_shard=len(toks))
        streams = unit_streams(enc, labels, targets)

        def container(rows) -> None:
            get_container("arrow").encode_unit(spec, 0, 0, list(range(len(rows))), [r.columns for r in rows])

        parts = {"numpy": lambda: container([encode_row(enc, tok, t) for tok, t in zip(toks, cpu)]),
                 f"device streams ({x.device.type})": lambda: unit_streams(enc, labels, targets),
                 "rest on CPU": lambda: container([encode_row(enc, tok, t.to("cpu"), streams=s)
                                                   for tok, t, s in zip(toks, targets, streams)])}
        for part, fn in parts.items():
            sec = statistics.median(timed(fn) for _ in range(repeats))
            print(f"encode {name:16s} {part:22s} {sec:8.3f} {n / sec:10.0f}", flush=True)
            out.append({**meta, "method": f"encode {name}: {part}", "dtype": "float32", "positions": n,
                        "seconds": f"{sec:.4f}", "positions_per_s": f"{n / sec:.1f}"})
    return out


if __name__ == "__main__":
    main()
