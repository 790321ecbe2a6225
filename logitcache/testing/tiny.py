"""A tiny, offline, deterministic teacher and small corpus writers, for tests.

``make_tiny_teacher`` trains a byte-level BPE tokenizer on Python's help topics
(``pydoc_data.topics``) and saves it, with a randomly initialised (seeded) ``LlamaForCausalLM``
of that vocabulary, as a Hugging Face model directory. It takes a few seconds on one CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``vocab_size`` entries; eos id 0, pad id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def make_tiny_teacher(
    path: str | Path,
    *,
    vocab_size: int = 300,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    max_positions: int = 256,
) -> str:
    """Write a tiny Llama teacher (float32 weights) and its tokenizer into ``path``; return the path.

    The same arguments give the same files. The global torch RNG is left untouched.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def write_text_corpus(directory: str | Path, docs: Sequence[str]) -> list[Path]:
    """One UTF-8 file per document, ``doc_000.txt``, ``doc_001.txt``, ...; returns the paths."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(docs):
        p = root / f"doc_{i:03d}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


def write_jsonl(path: str | Path, docs: Sequence[str], field: str = "text") -> Path:
    """One JSON object ``{field: text}`` per line; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps({field: text}) + "\n" for text in docs), encoding="utf-8")
    return p


def write_parquet(path: str | Path, docs: Sequence[str], field: str = "text") -> Path:
    """A Parquet file with one string column ``field``; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: pa.array(list(docs), type=pa.string())}), p)
    return p


__all__ = ["make_tiny_teacher", "make_tiny_tokenizer", "write_jsonl", "write_parquet", "write_text_corpus"]
