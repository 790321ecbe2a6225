"""The tokenizer fingerprint is the same under transformers 4.x and 5.x, and stores that recorded the form an
earlier logitcache computed under 4.x (the additional special tokens inside ``special_tokens_map``, which 4.x
lists there and 5.x does not) still train, export and resume. The 4.x view of a tokenizer is emulated here
(the installed transformers is one version); the real 4.57.1 / 5.19 pair was compared by hand (docs/format.md)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import as_interrupted, make_config
from transformers import AutoTokenizer

from logitcache.capture import capture
from logitcache.capture import pipeline
from logitcache.errors import StoreError
from logitcache.models.tokenizers import tokenizer_fingerprint, tokenizer_fingerprints
from logitcache.store import read_manifest
from logitcache.testing.crash import tree_bytes
from logitcache.train.cross_tokenizer import CrossTokenizerTransform
from logitcache.train.dataset import CacheDataset

SHAPE = {"corpus.seq_len": 16, "corpus.max_tokens": 16 * 3 * 4, "store.sequences_per_shard": 3}  # 4 units
EXTRA = ["<|pad|>", "<|endoftext|>"]  # the tiny teacher's own special tokens, listed as additional ones


def recorded_earlier(tok) -> str:
    """``tokenizer_fingerprint`` as logitcache computed it before: whatever ``special_tokens_map`` held."""
    payload = json.dumps({"vocab": sorted(tok.get_vocab().items()),
                          "special_tokens": dict(sorted(tok.special_tokens_map.items())),
                          "all_special_tokens": sorted(tok.all_special_tokens)},
                         ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class View:
    """A tokenizer as one transformers major version shows it: 4.x lists the additional special tokens in
    ``special_tokens_map`` (and as ``additional_special_tokens``), 5.x keeps them out of the map (as
    ``extra_special_tokens``); both count them in ``all_special_tokens``. Built from whichever version loaded it."""

    def __init__(self, tok, major: int) -> None:
        self.tok = tok
        extra = [str(t) for t in (getattr(tok, "additional_special_tokens", None) or tok.extra_special_tokens)]
        roles = {k: v for k, v in tok.special_tokens_map.items() if not k.endswith("special_tokens")}
        self.special_tokens_map = {**roles, "additional_special_tokens": extra} if major == 4 else roles
        self.additional_special_tokens = extra if major == 4 else None
        self.extra_special_tokens = extra if major == 5 else {}
        self.all_special_tokens = tok.all_special_tokens

    def get_vocab(self):
        return self.tok.get_vocab()


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tmp_path_factory) -> str:
    """The tiny teacher with additional special tokens in its tokenizer config."""
    path = Path(shutil.copytree(tiny_teacher, tmp_path_factory.mktemp("extra") / "teacher"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": EXTRA}))
    return str(path)


@pytest.fixture(scope="module")
def tok(teacher):
    loaded = AutoTokenizer.from_pretrained(teacher)
    assert View(loaded, 4).special_tokens_map["additional_special_tokens"] == EXTRA
    return loaded


def test_the_fingerprint_is_what_earlier_releases_recorded_under_5x_and_the_same_under_4x(tok, tiny_tokenizer):
    as4, as5 = View(tok, 4), View(tok, 5)
    assert tokenizer_fingerprint(tok) == recorded_earlier(as5)  # stores captured under 5.x keep theirs
    assert tokenizer_fingerprint(tiny_tokenizer) == recorded_earlier(tiny_tokenizer)
    assert tokenizer_fingerprints(tiny_tokenizer) == (tokenizer_fingerprint(tiny_tokenizer),)  # no extra tokens
    assert tokenizer_fingerprint(as4) == tokenizer_fingerprint(as5) == tokenizer_fingerprint(tok)  # 4.x gives it too
    earlier_4x = recorded_earlier(as4)
    assert earlier_4x != tokenizer_fingerprint(tok)  # what made a 4.x store refuse a 5.x student
    assert tokenizer_fingerprints(as4) == tokenizer_fingerprints(as5) == (tokenizer_fingerprint(tok), earlier_4x)


def test_an_extra_special_token_still_counts(tok, teacher, tmp_path):
    plain = next(t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t not in EXTRA)
    path = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": [*EXTRA, plain]}))
    other = AutoTokenizer.from_pretrained(path)
    assert plain in other.all_special_tokens and plain not in tok.all_special_tokens
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


@pytest.fixture(scope="module")
def store_4x(teacher, tok, tmp_path_factory):
    """A store as an earlier logitcache captured it under transformers 4.x: the 4.x form of the fingerprint."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(pipeline, "tokenizer_fingerprint", lambda t: recorded_earlier(View(t, 4)))
    try:
        path = tmp_path_factory.mktemp("store_4x") / "store"
        capture(make_config(teacher, path, "sample", **SHAPE), progress=False)
    finally:
        monkeypatch.undo()
    assert read_manifest(path).header.tokenizer.fingerprint == recorded_earlier(View(tok, 4))
    return path


def test_a_store_recorded_in_the_4x_form_trains_with_every_form_given(store_4x, tok):
    with pytest.raises(StoreError, match=r"tokenizer mismatch.*tokenizer_fingerprints\(tokenizer\)"):
        CacheDataset(str(store_4x), tokenizer_fingerprint=tokenizer_fingerprint(tok))
    ds = CacheDataset(str(store_4x), tokenizer_fingerprint=tokenizer_fingerprints(tok))
    assert len(ds) == read_manifest(store_4x).header.plan.sequences
    CrossTokenizerTransform(tok, tok, store=str(store_4x))  # the transform's own check accepts it too
    with pytest.raises(StoreError, match="tokenizer mismatch"):
        CacheDataset(str(store_4x), tokenizer_fingerprint=("f" * 64, "e" * 64))


def test_a_store_recorded_in_the_4x_form_resumes_keeping_it(store_4x, teacher, tmp_path):
    store = Path(shutil.copytree(store_4x, tmp_path / "s"))
    as_interrupted(store, committed=2)
    summary = capture(make_config(teacher, store, "sample", **SHAPE), progress=False)
    assert (summary.units_skipped, summary.units_written) == (2, 2)
    assert tree_bytes(store) == tree_bytes(store_4x)
