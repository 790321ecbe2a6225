"""A second tokenizer family for cross-tokenizer tests, made offline: a SentencePiece-style Unigram
tokenizer (``▁`` for spaces, a dummy prefix, byte fallback ``<0xNN>``) trained on Python's help topics."""

from __future__ import annotations

import json
from functools import lru_cache

from .tiny import _training_text


@lru_cache(maxsize=4)
def make_unigram_tokenizer(vocab_size: int = 1000):
    """A ``PreTrainedTokenizerFast`` of ``vocab_size`` trained pieces plus the 256 byte-fallback pieces;
    ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (eos and pad). Deterministic; a few seconds on one CPU."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      unk_token="<unk>", show_progress=False)
    trained.train_from_iterator(_training_text(), trainer=trainer)
    pieces = [tuple(p) for p in json.loads(trained.to_str())["model"]["vocab"]]
    pieces += [(f"<0x{b:02X}>", -100.0) for b in range(256)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


__all__ = ["make_unigram_tokenizer"]
