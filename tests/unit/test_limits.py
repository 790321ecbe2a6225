"""Silent limits (#19 item 4): each parameter whose sense depends on the teacher or the plan is refused
with a message or accepted with a stated warning, never quietly reinterpreted (docs/capture.md "Limits")."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from logitcache.capture.limits import check_teacher_limits, plan_warnings
from logitcache.capture.pipeline import capture_local, compute_unit, prepare_capture
from logitcache.capture.plan import Plan
from logitcache.capture.teachers import load_teacher
from logitcache.errors import ConfigError, TeacherError
from logitcache.store import iter_sequences, read_manifest
from helpers import SEQ_LEN, make_config

VOCAB = 300  # the tiny teacher's


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tmp_path_factory):
    return load_teacher(make_config(tiny_teacher, tmp_path_factory.mktemp("unused")).teacher)


@pytest.mark.parametrize("method", ["topk", "hybrid"])
@pytest.mark.parametrize("k", [VOCAB, VOCAB + 1, 100_000])
def test_k_not_below_the_vocabulary_is_refused_before_any_unit(tiny_teacher, teacher, tmp_path, method, k):
    config = make_config(tiny_teacher, tmp_path / "store", method, **{"sparsify.k": k})
    with pytest.raises(ConfigError) as err:
        capture_local(config, progress=False, teacher=teacher)
    msg = str(err.value)
    assert f"sparsify.k = {k}" in msg and f"vocabulary of {VOCAB} tokens" in msg
    assert "--method full" in msg and f"--k at most {VOCAB - 1}" in msg
    assert ("no tail left to sample" in msg) == (method == "hybrid")
    assert not (tmp_path / "store").exists()  # refused before the store (or any unit) exists


def test_k_one_below_the_vocabulary_is_a_real_head(tiny_teacher, teacher, tmp_path):
    config = make_config(tiny_teacher, tmp_path / "store", "hybrid", **{"sparsify.k": VOCAB - 1,
                                                                       "corpus.max_tokens": SEQ_LEN * 2})
    capture_local(config, progress=False, teacher=teacher)
    manifest = read_manifest(tmp_path / "store")
    assert manifest.header.head_size == VOCAB - 1 and manifest.header.params == {"k": VOCAB - 1, "samples": 20}
    check_teacher_limits(make_config(tiny_teacher, tmp_path, "sample", **{"sparsify.k": 10**6}), VOCAB)  # k unused
    check_teacher_limits(make_config(tiny_teacher, tmp_path, "full", **{"sparsify.k": 10**6}), VOCAB)


def test_seq_len_beyond_the_teachers_positions_is_refused(tiny_teacher, teacher, tmp_path):
    config = make_config(tiny_teacher, tmp_path / "store", **{"corpus.seq_len": 257, "corpus.max_tokens": 257})
    with pytest.raises(TeacherError, match=r"seq_len = 257 .* exceeds the teacher's max_positions = 256"):
        prepare_capture(config, teacher)
    # the window is seq_len + 1 tokens, of which the teacher reads seq_len: 256 fits
    plan = prepare_capture(make_config(tiny_teacher, tmp_path / "s", **{"corpus.seq_len": 256,
                                                                       "corpus.max_tokens": 256}), teacher)[0]
    assert plan.seq_len == 256 and plan.window(0).size == 257


def test_more_sequences_per_shard_than_the_plan_warns_and_makes_one_shard(tiny_teacher, teacher, tmp_path, caplog):
    config = make_config(tiny_teacher, tmp_path / "store", **{"store.sequences_per_shard": 64})
    with caplog.at_level(logging.WARNING, logger="logitcache"):
        capture_local(config, progress=False, teacher=teacher)
    assert "sequences_per_shard = 64 exceeds the plan's 10 sequences: the store has one shard of 10" in caplog.text
    plan = read_manifest(tmp_path / "store").header.plan
    assert (plan.shards, plan.sequences, plan.sequences_per_shard) == (1, 10, 64)


def test_batch_tokens_below_one_window_warns_and_changes_no_target(tiny_teacher, teacher, tmp_path, caplog):
    small = make_config(tiny_teacher, tmp_path / "a", batch_tokens=5)
    with caplog.at_level(logging.WARNING, logger="logitcache"):
        capture_local(small, progress=False, teacher=teacher)
    assert f"batch_tokens = 5 is less than one window (seq_len + 1 = {SEQ_LEN + 1} tokens)" in caplog.text
    capture_local(make_config(tiny_teacher, tmp_path / "b", batch_tokens=10 * (SEQ_LEN + 1)), progress=False,
                  teacher=teacher)
    assert_same_targets(tmp_path / "a", tmp_path / "b")


def test_head_chunk_beyond_seq_len_is_the_whole_window(tiny_teacher, teacher, tmp_path):
    """Accepted without a warning: a chunk longer than the window is the window, the targets are identical."""
    plans = {}
    for chunk in (SEQ_LEN, 10 * SEQ_LEN):
        config = make_config(tiny_teacher, tmp_path / str(chunk), "hybrid", **{"teacher.head_chunk": chunk})
        plan, units, _, _ = prepare_capture(config, teacher)
        plans[chunk] = compute_unit(teacher, plan, units[0], config)
    (ids_a, _, targets_a, *_), (ids_b, _, targets_b, *_) = plans.values()
    assert ids_a == ids_b
    for a, b in zip(targets_a, targets_b):
        assert_targets_equal(a, b)


def test_no_warning_for_parameters_within_the_plan(tiny_teacher, tmp_path):
    plan = Plan(np.zeros(10 * SEQ_LEN + 1, dtype=np.int32), SEQ_LEN, 10, "f" * 64, {})
    assert plan_warnings(make_config(tiny_teacher, tmp_path, **{"store.sequences_per_shard": 10}), plan) == []


def assert_targets_equal(a, b) -> None:
    """Two SparseTargets, field by field, bit for bit."""
    import dataclasses

    import torch

    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None and y is None) or (torch.is_tensor(x) and torch.equal(x, y)) or x == y, f.name


def assert_same_targets(a, b) -> None:
    left, right = list(iter_sequences(a)), list(iter_sequences(b))
    assert len(left) == len(right) == 10
    for (id_a, tok_a, t_a), (id_b, tok_b, t_b) in zip(left, right):
        assert id_a == id_b and np.array_equal(tok_a, tok_b)
        assert_targets_equal(t_a, t_b)


@pytest.mark.parametrize(("method", "k"), [("sample", 5), ("hybrid", VOCAB - 2)])
def test_more_samples_than_tokens_left_is_meaningful(tiny_teacher, teacher, tmp_path, method, k):
    """Draws are with replacement: N = 1000 over V = 300 tokens (or a tail of 2) keeps all N as counts."""
    config = make_config(tiny_teacher, tmp_path, method, **{"sparsify.samples": 1000, "sparsify.k": k})
    plan, units, _, _ = prepare_capture(config, teacher)
    targets = compute_unit(teacher, plan, units[0], config)[2][0]
    lengths = targets.sample_lengths.tolist()
    counts = targets.sample_counts.split(lengths)
    assert all(int(c.sum()) == 1000 for c in counts)
    assert max(lengths) <= (VOCAB if method == "sample" else 2)
