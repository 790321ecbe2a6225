"""Teachers over sequences of different lengths: each sequence sees only itself.

Checked against two references: the same sequence run alone, and the model's own dense forward
``model(ids).logits`` on that sequence without any padding. A planted bug (left padding, where real
positions do attend to pads and are shifted) must fail.
"""

from __future__ import annotations

import pytest
import torch

from logitcache.capture.config import TeacherConfig
from logitcache.capture.teachers import HFTeacher
from logitcache.capture.teachers import base
from logitcache.errors import TeacherError

LENGTHS = [5, 17, 64, 65, 3, 130, 64, 1]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    t = HFTeacher.load(TeacherConfig(model=tiny_teacher, dtype="float32", device="cpu"))
    yield t
    t.close()


def sequences(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def per_row(chunks) -> dict[int, torch.Tensor]:
    rows: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for row, start, logits in chunks:
        rows.setdefault(row, []).append((start, logits.clone()))
    out = {}
    for row, parts in rows.items():
        starts = [s for s, _ in parts]
        assert starts == sorted(starts), "chunks of one row must come in order"
        out[row] = torch.cat([p for _, p in parts])
    return out


def test_bucket_length_depends_on_the_length_alone():
    assert [base.bucket_length(n, 256) for n in (1, 63, 64, 65, 200, 256)] == [64, 64, 64, 128, 256, 256]
    assert base.bucket_length(100, 100) == 100  # never beyond the model's positions
    groups = base.bucket_groups([5, 70, 64, 1, 129], 256)
    assert groups == [(64, [0, 2, 3]), (128, [1]), (192, [4])]


def test_each_sequence_equals_itself_alone_and_the_dense_model(teacher):
    seqs = sequences(teacher.vocab_size)
    batched = per_row(teacher.forward_sequences(seqs, 7))
    assert sorted(batched) == list(range(len(seqs)))
    for row, seq in enumerate(seqs):
        alone = per_row(teacher.forward_sequences([seq], 7))[0]
        assert batched[row].shape == (seq.numel(), teacher.vocab_size)
        assert torch.equal(batched[row], alone), row  # same bucket shape: bit for bit, whatever the batch
        with torch.inference_mode():
            dense = teacher.model(input_ids=seq[None], use_cache=False).logits[0].float()
        torch.testing.assert_close(batched[row].float(), dense, atol=1e-5, rtol=1e-5)


def test_equal_lengths_match_forward_chunks(teacher):
    """Windows of one length through either entry point give the same logits (within fp32 rounding:
    forward_chunks runs them unpadded, forward_sequences padded to their bucket)."""
    seqs = sequences(teacher.vocab_size, [40, 40, 40])
    windows = per_row(teacher.forward_chunks(torch.stack(seqs), 9))
    varlen = per_row(teacher.forward_sequences(seqs, 9))
    for row in range(3):
        torch.testing.assert_close(windows[row], varlen[row], atol=1e-5, rtol=1e-5)


def test_a_planted_left_padding_bug_fails(teacher, monkeypatch):
    def left_padded(seqs, padded, device):
        batch = torch.zeros(len(seqs), padded, dtype=torch.long, device=device)
        for i, seq in enumerate(seqs):
            batch[i, padded - seq.numel():] = seq
        return batch

    from logitcache.capture.teachers import hf

    monkeypatch.setattr(hf, "right_padded", left_padded)
    seqs = sequences(teacher.vocab_size, [5, 40])
    got = per_row(teacher.forward_sequences(seqs, 64))
    with torch.inference_mode():
        dense = teacher.model(input_ids=seqs[0][None], use_cache=False).logits[0].float()
    assert not torch.allclose(got[0][: seqs[0].numel()].float(), dense, atol=1e-3)


@pytest.mark.parametrize("bad, message", [
    ([], "non-empty list"),
    ([torch.zeros(3, dtype=torch.int32)], "sequence 0 must be a 1-D int64 tensor; found torch.int32"),
    ([torch.zeros(2, dtype=torch.long), torch.zeros(0, dtype=torch.long)], "non-empty"),
    ([torch.full((4,), 10**6, dtype=torch.long)], "token ids must lie in"),
    ([torch.zeros(10**4, dtype=torch.long)], "exceed teacher"),
])
def test_bad_sequences_are_refused_before_compute(teacher, bad, message):
    with pytest.raises(TeacherError, match=message):
        teacher.forward_sequences(bad, 4)
