"""A randomly initialised teacher with a real teacher's architecture and tokenizer (for timing only).

The GPU machine cannot download weights and only a few MiB travel to it, so GPU timings use a model
built from the real teacher's ``config.json`` and tokenizer with random weights: the same shapes,
so the same FLOPs and memory traffic as the real model. A random model's next-token distribution is
nearly uniform (tens of distinct ids per 50 draws), which would make sampling and encoding look
costlier than on a trained teacher, so ``--norm-scale`` multiplies the final norm's weight to
sharpen the logits; ``--calibrate`` reports distinct ids per position of N=50 draws for a few
scales on pydoc text, to pick the one matching the real teacher (16.2 for SmolLM2-135M).

    python benchmarks/random_teacher.py --like ~/.cache/logitcache/teachers/smollm2-135m-instruct \\
        --out /tmp/smollm2-random --norm-scale 11
    # SmolLM2-1.7B's shape (same tokenizer and vocabulary), for the head-share comparison in docs/scaling.md
    python benchmarks/random_teacher.py --like ... --out /tmp/smollm2-1.7b-random --norm-scale 11 \
        --set hidden_size=2048 --set intermediate_size=8192 --set num_hidden_layers=24 \
        --set num_attention_heads=32 --set num_key_value_heads=32
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

# everything but the weights: config, tokenizer, templates
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja")


def build(like: Path, out: Path, norm_scale: float, seed: int = 0, overrides: dict | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (like / name).is_file():
            shutil.copy(like / name, out / name)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(like)
    for key, value in (overrides or {}).items():  # another shape with the same tokenizer
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.mul_(norm_scale)
    model.save_pretrained(out)
    return out


def distinct_ids(model_dir: Path, positions: int = 1024, draws: int = 50) -> float:
    """Mean distinct ids per position of ``draws`` draws from the model's distribution on pydoc text."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok("\n\n".join(topics.values()), return_tensors="pt").input_ids[0][:positions].reshape(-1, 256)
    with torch.inference_mode():
        probs = torch.softmax(model(ids).logits.reshape(-1, model.config.vocab_size).float(), -1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=torch.Generator().manual_seed(0))
    return float(torch.tensor([row.unique().numel() for row in drawn]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", type=Path, required=True, help="the real teacher's directory (config + tokenizer)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--norm-scale", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                    help="override a config field, e.g. hidden_size=2048 (repeatable)")
    ap.add_argument("--calibrate", default="", help="comma-separated scales to report distinct ids for")
    args = ap.parse_args()
    for scale in filter(None, args.calibrate.split(",")):
        path = build(args.like, args.out / f"scale-{scale}", float(scale))
        print(f"norm scale {scale}: {distinct_ids(path):.1f} distinct ids per position of 50 draws", flush=True)
    if not args.calibrate:
        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
        print(build(args.like, args.out, args.norm_scale, overrides=overrides))


if __name__ == "__main__":
    main()
