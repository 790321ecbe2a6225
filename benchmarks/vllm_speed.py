"""vLLM backend throughput ÷ vLLM prefill-only throughput on the same prompts, and Ray scaling.

In one process, on the same windows, interleaved (baseline, ours, baseline, ours, ...):

* ``prefill``: a vLLM generate engine, ``max_tokens=1``, no logprobs — the bare prefill baseline
  (prefix caching off, as in the pooling engine: the prompts repeat across rounds).
* ``hidden``: the pooling engine alone (``token_embed`` hidden states, no head): vLLM's side of ours.
* ``capture/<method>``: the whole ``logitcache.capture.capture`` with the vllm backend — hidden
  states, our output head, sparsifier, Arrow encoding, checksums, fsync, manifest.
* ``prompt_logprobs-64``: vLLM's own top-k route (flat, no detokenisation) for comparison.

``--ray`` adds a capture through Ray with 1 and 2 workers (HF backend, RS-KD N=50, one window per
unit, one CPU and one thread per worker, engines loaded before the clock starts) against the same
capture in this process. Rows append to the CSV (see common.py).

    python benchmarks/vllm_speed.py --ray    # appends to benchmarks/results/vllm_speed.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
from functools import partial
from pathlib import Path

from common import (PROVENANCE, ResultsFile, capture_arguments, csv_argument, interleave, print_row, provenance,
                    timed)

METHODS = {"topk-64": {"method": "topk", "k": 64}, "sample-50": {"method": "sample", "samples": 50},
           "hybrid-12+50": {"method": "hybrid", "k": 12, "samples": 50}}
COLUMNS = PROVENANCE + ("teacher", "head_share", "backend", "dtype", "route", "workers", "positions", "tok_s",
                        "ratio_vs_baseline", "baseline", "load_1min")


def head_share(teacher) -> float:
    """The output head's share of the parameters that every position's forward multiplies by:
    ``V·d / (body + V·d)``. The capture computes the head at every position and a prefill only at
    the last, so ``1 − head_share`` bounds capture ÷ prefill (attention FLOPs aside)."""
    from transformers import AutoConfig

    from logitcache.capture.teachers import resolve_teacher_path

    c = AutoConfig.from_pretrained(resolve_teacher_path(teacher.name)).get_text_config()
    d, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = d // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    body = layers * (d * (2 * d + 2 * kv) + 3 * d * inter)
    head = c.vocab_size * d
    return head / (body + head)


def vllm_rows(args, workdir: Path) -> list[dict]:
    from vllm import SamplingParams, TokensPrompt

    from logitcache.capture import capture
    from logitcache.capture.pipeline import prepare_capture
    from logitcache.capture.config import CaptureConfig
    from logitcache.capture.teachers import load_teacher, resolve_teacher_path
    from logitcache.capture.teachers.vllm import prompt_topk, start_engine

    engine = {"enforce_eager": True, "max_model_len": args.seq_len + 8}
    base = CaptureConfig().with_overrides({
        "teacher.model": args.teacher, "teacher.backend": "vllm", "teacher.dtype": args.dtype, "teacher.device": "cpu",
        "teacher.engine": engine,
        "corpus.seq_len": args.seq_len, "corpus.max_tokens": args.tokens, "batch_tokens": args.batch_tokens})
    teacher = load_teacher(base.teacher)
    generate_config = dataclasses.replace(base.teacher, engine={**engine, "max_logprobs": 64,
                                                                     "enable_prefix_caching": False})
    generate = start_engine(resolve_teacher_path(base.teacher.model), generate_config, pooling=False)
    plan, _, _, _ = prepare_capture(base, teacher)
    rows_ids = [plan.window(i)[:-1].tolist() for i in range(plan.num_windows)]
    prompts = [TokensPrompt(prompt_token_ids=r) for r in rows_ids]
    positions = plan.num_windows * plan.seq_len
    prefill = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    per_batch = max(1, args.batch_tokens // (args.seq_len + 1))
    runs = {
        "prefill": lambda: generate.generate(prompts, prefill, use_tqdm=False),
        "hidden": lambda: [teacher.hidden_states(rows_ids[i:i + per_batch]) for i in range(0, len(rows_ids), per_batch)],
        "prompt_logprobs-64": lambda: prompt_topk(generate, rows_ids, 64),
    }
    for name, over in METHODS.items():
        config = base.with_overrides({**{f"sparsify.{k}": v for k, v in over.items()}, "store.path": str(workdir / name)})
        runs[f"capture/{name}"] = lambda c=config: capture(c, overwrite=True, progress=False, teacher=teacher)
    seconds = interleave({name: partial(timed, fn) for name, fn in runs.items()}, args.repeats)
    base_s = statistics.median(seconds["prefill"])
    rows = []
    share = round(head_share(teacher), 3)
    for name, s in seconds.items():
        med = statistics.median(s)
        rows.append({**provenance(), "teacher": args.teacher, "head_share": share,
                     "backend": "vllm", "dtype": args.dtype, "route": name, "workers": 0,
                     "positions": positions, "tok_s": round(positions / med, 1),
                     "ratio_vs_baseline": round(base_s / med, 3), "baseline": "vllm prefill (max_tokens=1)",
                     "load_1min": round(os.getloadavg()[0], 2)})
    teacher.close()
    return rows


def ray_rows(args, workdir: Path) -> list[dict]:
    import ray

    from logitcache.capture import capture
    from logitcache.capture.config import CaptureConfig

    base = CaptureConfig().with_overrides({
        "teacher.dtype": args.dtype, "teacher.device": "cpu", "corpus.seq_len": args.seq_len,
        "corpus.max_tokens": args.tokens, "batch_tokens": args.batch_tokens, "sparsify.method": "sample",
        "sparsify.samples": 50, "store.sequences_per_shard": 1})
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(workdir / "ray"), configure_logging=False)
    configs = {workers: base.with_overrides({"workers": workers, "store.path": str(workdir / f"ray{workers}")})
               for workers in (0, 1, 2)}
    try:  # the warm-up round warms caches and Ray's worker pool
        seconds = interleave({workers: lambda c=config: capture(c, overwrite=True, progress=False).seconds
                              for workers, config in configs.items()}, args.repeats)
    finally:
        ray.shutdown()
    positions = (args.tokens // args.seq_len) * args.seq_len
    base_s = statistics.median(seconds[0])
    return [{**provenance(), "teacher": "embedded:smollm2-135m-instruct", "head_share": "", "backend": "hf",
             "dtype": args.dtype, "route": "capture/sample-50",
             "workers": w, "positions": positions, "tok_s": round(positions / statistics.median(s), 1),
             "ratio_vs_baseline": round(base_s / statistics.median(s), 3),
             "baseline": "in-process capture (2 threads)", "load_1min": round(os.getloadavg()[0], 2)}
            for w, s in seconds.items()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    capture_arguments(ap)
    ap.add_argument("--teacher", default="embedded:smollm2-135m-instruct",
                    help="teacher model (a directory; benchmarks/random_teacher.py makes one of any shape)")
    ap.add_argument("--ray", action="store_true", help="also measure Ray capture with 1 and 2 workers")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM measurements")
    csv_argument(ap, "vllm_speed.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    workdir = Path(tempfile.mkdtemp(prefix="lc-vllm-bench-"))
    try:
        rows = [] if args.no_vllm else vllm_rows(args, workdir)
        if args.ray:
            rows += ray_rows(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        print_row(row)
    out.append(rows)


if __name__ == "__main__":
    main()
