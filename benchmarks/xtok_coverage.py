"""Cross-tokenizer numbers for docs/cross_tokenizer.md: vocabulary-map coverage of the tokenizer pairs the
tests use, the SmolLM2 teacher's probability mass that maps, the student positions by group kind, and the
realized-token log-probability (what the store would add): how often a top-k head holds it, its bytes.

    python benchmarks/xtok_coverage.py        # ~1 min on 2 CPU cores; prints markdown tables
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.models.embedded import resolve_teacher_path
from logitcache.testing.targets import build_full
from logitcache.testing.tiny import make_tiny_tokenizer
from logitcache.testing.tokenizers import make_unigram_tokenizer
from logitcache.train.cross_tokenizer import CrossTokenizerTransform
from logitcache.train.vocab_map import vocab_map

COVERAGE_TOPICS, REALIZED_TOPICS = ("assert", "lambda", "for"), ("assert", "lambda", "for", "if", "while", "try")


def teacher_logprobs(model, tokenizer, names: tuple[str, ...], positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids int64[positions + 1], log-probabilities [positions, V])`` of the teacher on pydoc help topics."""
    ids = torch.tensor(tokenizer("".join(topics[n] for n in names), add_special_tokens=False)["input_ids"])
    ids = ids[: positions + 1]
    with torch.no_grad():
        return ids, torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)


def coverage_table(tokenizers: dict, ids: torch.Tensor, logp: torch.Tensor) -> None:
    print("| teacher | student | vocabulary mapped | teacher mass that maps | 1:1 / many:1 / skipped / 1:many / "
          "many:many | exact mass at KD positions |\n|---|---|---|---|---|---|")
    t = logp.exp()
    for a, ta in tokenizers.items():
        for b, tb in tokenizers.items():
            if a == b:
                continue
            m = vocab_map(ta, tb, cache=False)
            row = f"| {a} ({len(ta)}) | {b} ({len(tb)}) | {m.coverage:.4f} |"
            if a == "SmolLM2":
                mapped = float((t * torch.from_numpy(m.teacher_to_student[: t.shape[1]] >= 0)).sum(-1).mean())
                item = {"seq_id": 0, "input_ids": ids[:-1], "labels": ids[1:], "targets": build_full(t)}
                stats = CrossTokenizerTransform(ta, tb, cache=False)(item).stats
                n = stats.positions
                kinds = " / ".join(str(n[k]) for k in ("one_to_one", "many_to_one", "many_to_one_skipped",
                                                       "one_to_many", "many_to_many"))
                per_kd = stats.exact_mass / max(n["one_to_one"] + n["many_to_one"], 1)
                row += f" {mapped:.3f} | {kinds} | {per_kd:.3f} |"
            else:
                row += " – | – | – |"
            print(row)


def realized_table(ids: torch.Tensor, logp: torch.Tensor) -> None:
    labels = ids[1:, None]
    realized = logp.gather(1, labels)[:, 0].numpy()
    rank = (logp > logp.gather(1, labels)).sum(1).numpy()
    print(f"\n{realized.size} positions; label in the top-k head: "
          + ", ".join(f"k={k} {np.mean(rank < k):.3f}" for k in (1, 8, 12, 64)))
    for dtype in (np.float32, np.float16):
        raw = realized.astype(dtype).tobytes()
        print(f"{np.dtype(dtype).name}: {len(raw) / realized.size:.2f} B/position, "
              f"zlib-9 {len(zlib.compress(raw, 9)) / realized.size:.2f} B/position")


def main() -> None:
    path = resolve_teacher_path("embedded:smollm2-135m-instruct")
    smollm2 = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizers = {"SmolLM2": smollm2, "Unigram 1k": make_unigram_tokenizer(), "tiny BPE": make_tiny_tokenizer()}
    coverage_table(tokenizers, *teacher_logprobs(model, smollm2, COVERAGE_TOPICS, 512))
    realized_table(*teacher_logprobs(model, smollm2, REALIZED_TOPICS, 2048))


if __name__ == "__main__":
    main()
