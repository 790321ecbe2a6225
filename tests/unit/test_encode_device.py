"""The batched torch encode (logitcache.store.encode_device) against the numpy reference (encoding.row_streams).

Its code is device-agnostic, so on the CPU it runs with CPU tensors (the writer picks it by itself only for
targets on an accelerator: here ``writer.on_device`` is switched to pick it), and where CUDA is at hand the same
checks run with the targets on the GPU. Targets come from the real sparsifiers (and the adaptive-budget
allocation) on logits with a few strong ids, so labels are often but not always among the stored ids.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from logitcache.capture import capture
from logitcache.capture.budget import sequence_targets
from logitcache.capture.config import SparsifyConfig
from logitcache.capture.sparsify import draw_uniforms, sparsify
from logitcache.errors import TargetsError
from logitcache.store import bits, writer
from logitcache.store.encode_device import _pack_rows, on_device, unit_streams
from logitcache.store.encoding import Encoding, corpus_order, encode_row, row_labels
from logitcache.store.spec import ShardSpec
from logitcache.testing.crash import tree_bytes
from helpers import DEVICES, make_config

VOCAB = 300
LENGTHS = (13, 40, 1, 7)  # positions of a unit's rows (documents rows: trained positions of longer rows)


def _targets(method: str, logits: torch.Tensor, seed: int, *, weighted: bool, adaptive: bool):
    cfg = SparsifyConfig(method=method, k=6, samples=20, temperature=0.8 if weighted else 1.0,
                         allocation="variance" if adaptive else "fixed")
    draws = 80 if adaptive else 20
    u = draw_uniforms(0, seed, logits.shape[0], draws) if method != "topk" else None
    return sequence_targets([sparsify(logits, cfg, u)], cfg.samples)


def unit_rows(method: str, documents: bool, *, labels: bool = False, weighted: bool = False,
              adaptive: bool = False, seed: int = 0):
    """``(tokens, targets, masks)`` of a unit of four rows, one of them without trained positions (documents)."""
    rng = np.random.default_rng(seed)
    tokens, targets, masks = [], [], []
    for r, n in enumerate(LENGTHS):
        mask = None
        if documents:
            mask = (rng.random(n + 5) < 0.7) & (r != 2)  # row 2 trains nowhere
        positions = n if mask is None else int(mask.sum())
        logits = torch.randn(positions, VOCAB, generator=torch.Generator().manual_seed(seed * 10 + r)) * 3
        logits[:, rng.integers(0, VOCAB, 4)] += 7
        label = np.where(rng.random(positions) < 0.6, logits.argmax(1).numpy(), rng.integers(0, VOCAB, positions))
        tok = rng.integers(0, VOCAB, (positions if mask is None else mask.size) + 1)
        tok[1:][mask if mask is not None else slice(None)] = label
        t = _targets(method, logits, seed * 10 + r, weighted=weighted, adaptive=adaptive)
        if labels:
            exact = torch.log_softmax(logits, -1)[torch.arange(positions), torch.from_numpy(label)]
            t = replace(t, label_logprobs=exact)
        tokens.append(tok)
        targets.append(t)
        masks.append(mask)
    return tokens, targets, masks if documents else None


def encoding(ids: str, **kw) -> Encoding:
    order = corpus_order(np.random.default_rng(5).zipf(1.4, 4000) % VOCAB, VOCAB) if ids == "rank-delta" else ()
    return Encoding(ids=ids, vocab_size=VOCAB, order=order, **kw)


def to(targets, device: str):
    return [t.to(device) for t in targets]


# every targets shape: method x layout x (fixed, weighted, adaptive budget) x label logprobs
SHAPES = [(m, d, w, a, lab)
          for m, d, lab in itertools.product(("topk", "sample", "hybrid"), (False, True), (False, True))
          for w, a in ((False, False), (True, False), (False, True))
          if (m != "topk" or not (w or a)) and (m == "sample" or not w)]


@pytest.mark.parametrize(("method", "documents", "weighted", "adaptive", "labels"), SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_device_path_writes_the_reference_bytes(monkeypatch, method, documents, weighted, adaptive, labels, device):
    """Every id codec x logprob codec x entropy stage: the unit's objects and record are byte for byte the
    numpy path's (the device path forced where the targets are on the CPU)."""
    tokens, targets, masks = unit_rows(method, documents, labels=labels, weighted=weighted, adaptive=adaptive)
    for ids, logprobs, entropy in itertools.product(("rank-delta", "packed"), ("float32", "float16", "q8"),
                                                    ("zstd", "ans")):
        enc = encoding(ids, logprobs=logprobs, entropy=entropy, label_logprobs=labels, sample_totals=adaptive)
        spec = ShardSpec(method=method, encoding=enc, k=6 if method != "sample" else 0,
                         num_samples=20 if method != "topk" else 0, weighted=weighted, masked=documents)
        args = (spec, 3, [0, 1, 2, 3], tokens)
        monkeypatch.setattr(writer, "on_device", lambda t: False)
        want = writer.encode_unit(*args, targets, masks)
        monkeypatch.setattr(writer, "on_device", lambda t: True)
        got = writer.encode_unit(*args, to(targets, device), masks)
        assert got == want, (ids, logprobs, entropy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids", ["rank-delta", "packed"])
def test_streams_equal_the_reference_at_a_large_vocabulary(ids, device):
    """V = 2**18 spreads the ranks, so gaps and packed ids take every bit width up to 18 and fields cross
    32-bit words; row by row the reference's bytes."""
    vocab, rng = 1 << 18, np.random.default_rng(3)
    order = tuple(rng.permutation(vocab)[:5000].tolist()) if ids == "rank-delta" else ()
    enc = Encoding(ids=ids, vocab_size=vocab, order=order)
    tokens, targets = [], []
    for n in (30, 9):
        logits = torch.full((n, vocab), -30.0)
        logits[torch.arange(n)[:, None], torch.from_numpy(rng.integers(0, vocab, (n, 40)))] = torch.randn(n, 40)
        t = _targets("hybrid", logits, n, weighted=False, adaptive=False)
        tokens.append(np.concatenate([[0], np.where(rng.random(n) < 0.5, t.head_ids[:, 0].numpy(), 7)]))
        targets.append(t)
    labels = [row_labels(tok, t, None) for tok, t in zip(tokens, targets)]
    got = unit_streams(enc, labels, to(targets, device))
    for tok, t, s in zip(tokens, targets, got, strict=True):
        assert encode_row(enc, tok, t, streams=s).columns == encode_row(enc, tok, t).columns
        assert len(s.head.bits) > 0 and len(s.sample.bits) > 0


@settings(max_examples=150, deadline=None)
@given(widths=st.lists(st.lists(st.integers(0, 32), max_size=40), min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_bit_packing_matches_bits_module(widths, seed):
    """Fields of every width 0..32 (so every crossing of a 32-bit word), several rows in one call: each row's
    bytes are what bits.pack of that row alone writes."""
    rng = np.random.default_rng(seed)
    flat = np.array([w for row in widths for w in row], dtype=np.int64)
    values = rng.integers(0, 1 << 33, flat.size, dtype=np.int64)  # bits above each width must be dropped
    rows = np.repeat(np.arange(len(widths)), [len(r) for r in widths])
    got = _pack_rows(torch.from_numpy(values), torch.from_numpy(flat), torch.from_numpy(rows), len(widths))
    want = [bits._pack_variable(values[rows == r], flat[rows == r]) for r in range(len(widths))]
    assert got == want


@pytest.mark.parametrize("device", DEVICES)
def test_ids_outside_the_vocabulary_are_refused_as_the_reference_refuses_them(device):
    tokens, targets, _ = unit_rows("hybrid", False)
    bad = replace(targets[1], sample_ids=targets[1].sample_ids.clone())
    bad.sample_ids[4] = VOCAB + 3
    enc = encoding("rank-delta")
    labels = [row_labels(tok, t, None) for tok, t in zip(tokens, targets)]
    with pytest.raises(TargetsError) as want:
        encode_row(enc, tokens[1], bad)
    with pytest.raises(TargetsError) as got:
        unit_streams(enc, labels, to([targets[0], bad, *targets[2:]], device))
    assert "fall outside the vocabulary [0, 300)" in str(want.value) and str(got.value) == str(want.value)


def test_targets_made_under_inference_mode_encode_outside_it():
    """The capture's teacher runs under inference_mode; the encode threads do not."""
    with torch.inference_mode():
        tokens, targets, _ = unit_rows("hybrid", False, labels=True)
    enc = encoding("rank-delta", label_logprobs=True)
    got = unit_streams(enc, [row_labels(tok, t, None) for tok, t in zip(tokens, targets)], targets)
    assert [encode_row(enc, tok, t, streams=s).columns for tok, t, s in zip(tokens, targets, got)] == \
        [encode_row(enc, tok, t).columns for tok, t in zip(tokens, targets)]


def test_the_writer_picks_the_device_path_for_targets_off_the_cpu():
    _, targets, _ = unit_rows("sample", False)
    assert not on_device(targets)
    assert on_device([replace(t, sample_ids=t.sample_ids.to("meta")) for t in targets])


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_a_capture_through_the_device_path_is_byte_identical(monkeypatch, tiny_teacher, tmp_path, method):
    """A whole tiny-teacher capture (three encode threads) with the device path forced on the CPU: the same store."""
    stores = {}
    for forced in (False, True):
        monkeypatch.setattr(writer, "on_device", lambda t, forced=forced: forced)
        config = make_config(tiny_teacher, tmp_path / str(forced), method, encode_threads=3,
                             **{"store.label_logprobs": True})
        capture(config, progress=False)
        stores[forced] = tree_bytes(Path(config.store.path))
    assert stores[True] == stores[False]
