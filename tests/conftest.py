"""Shared fixtures. The tiny teacher is built once per test session, fully offline."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """Path of a tiny Llama teacher + byte-level BPE tokenizer (vocab 300, max_positions 256)."""
    from logitcache.testing.tiny import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_teacher):
    """The tiny teacher's tokenizer (eos id 0)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)
