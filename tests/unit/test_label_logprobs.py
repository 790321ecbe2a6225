"""The realized-token log-probability column (``store.label_logprobs``, ``--label-logprobs``): exact against
the log-softmax of a dense forward of the tiny teacher (packed and documents captures), round trips through
every method × id code × entropy stage × container and through ``convert``, byte-identical under other
batching and after a SIGKILL and resume, stores without it unchanged, and bad values refused."""

from __future__ import annotations

import dataclasses
import signal

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_config, write_chat_corpus
from logitcache.capture import capture
from logitcache.capture.sparsify import label_logprobs
from logitcache.errors import CorruptShardError, StoreMismatchError, TargetsError
from logitcache.store import inspect_store, read_manifest, verify_store
from logitcache.store.convert import convert
from logitcache.store.encoding import Encoding, encode_row
from logitcache.store.row_decode import decode_row
from logitcache.store.reader import iter_sequences
from logitcache.testing.crash import job_args, run_with_fault, tree_bytes
from logitcache.testing.store_conformance import VOCAB, make_header, make_rows, write_store
from logitcache.testing.targets import assert_equal, canonical


@pytest.fixture(scope="module")
def dense(tiny_teacher):
    """``log_softmax`` of the tiny teacher's dense fp32 forward over ``tokens[:-1]``, as a function."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()

    def logprobs(tokens: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(tokens.astype(np.int64))
        with torch.no_grad():
            return torch.log_softmax(model(x[None, :-1]).logits[0].double(), -1)

    return logprobs


def check_exact(store, dense) -> int:
    """Every stored label log-probability equals the dense forward's at the same position (compact in a
    documents row) within 2e-6, and the head's value where the head holds the label; positions checked."""
    checked = 0
    for _, tokens, mask, targets in iter_sequences(store, with_mask=True):
        lp = dense(tokens)
        labels = torch.from_numpy(tokens[1:].astype(np.int64))
        keep = torch.ones(labels.numel(), dtype=torch.bool) if mask is None else torch.from_numpy(mask)
        expected = lp.gather(1, labels[:, None])[:, 0][keep]
        assert targets.label_logprobs.dtype == torch.float32
        assert torch.allclose(targets.label_logprobs.double(), expected, atol=2e-6, rtol=0)
        if targets.has_head:
            hit = targets.head_ids.long() == labels[keep][:, None]
            assert torch.allclose(targets.label_logprobs[hit.any(1)], targets.head_logprobs[hit], atol=1e-6)
        checked += int(keep.sum())
    return checked


@pytest.mark.parametrize("method", ["sample", "topk", "hybrid"])
def test_a_packed_capture_keeps_the_exact_label_logprobs(tiny_teacher, tmp_path, dense, method):
    store = tmp_path / "s"
    capture(make_config(tiny_teacher, store, method, **{"store.label_logprobs": True}), progress=False)
    assert check_exact(store, dense) == read_manifest(store).header.plan.positions
    assert verify_store(store).ok
    encoding = inspect_store(store)["encoding"]
    assert encoding["version"] == 4 and encoding["label_logprobs"] is True


def test_a_documents_capture_keeps_them_at_trained_positions(tiny_teacher, tmp_path, dense):
    path, template = write_chat_corpus(tmp_path)
    config = make_config(tiny_teacher, tmp_path / "s", "sample", **{
        "corpus.source": str(path), "corpus.max_tokens": None, "corpus.seq_len": 120, "corpus.long_sequences": "split",
        "corpus.chat_template": str(template), "store.label_logprobs": True, "store.entropy": "ans"})
    capture(config, progress=False)
    header = read_manifest(tmp_path / "s").header
    assert header.layout == "documents"
    assert check_exact(tmp_path / "s", dense) == header.plan.positions  # trained positions only, compact


def test_the_column_is_batch_independent_and_resumes_byte_identical(tiny_teacher, tmp_path):
    """The same bytes under another forward batching and head chunking of the same identity, and after a
    SIGKILL in the middle of the capture followed by a resume."""
    config = make_config(tiny_teacher, tmp_path / "ref", "hybrid", **{"store.label_logprobs": True,
                                                                       "store.sequences_per_shard": 2})
    capture(config, progress=False)
    other = config.with_overrides({"store.path": str(tmp_path / "other"), "batch_tokens": 17 * 3})
    capture(other, progress=False)
    assert tree_bytes(tmp_path / "other") == tree_bytes(tmp_path / "ref")
    out = tmp_path / "killed"
    killed = run_with_fault(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "j.yaml"),
                            "after_commit:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    summary = capture(config.with_overrides({"store.path": str(out)}), progress=False)
    assert summary.units_skipped == 2 and tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_without_the_flag_nothing_changes_and_a_changed_flag_is_refused(tiny_teacher, tmp_path):
    config = make_config(tiny_teacher, tmp_path / "s", "sample")
    assert "label_logprobs" not in config.identity()["store"]
    assert config.with_overrides({"store.label_logprobs": True}).identity()["store"]["label_logprobs"] is True
    capture(config, progress=False)
    header = read_manifest(tmp_path / "s").header
    assert header.store.encoding.to_manifest()["version"] == 2 and "label_logprobs" not in header.store.encoding.to_manifest()
    assert all(t.label_logprobs is None for _, _, t in iter_sequences(tmp_path / "s"))
    with pytest.raises(StoreMismatchError, match="identity.store.label_logprobs: store has None, this run has True"):
        capture(config.with_overrides({"store.label_logprobs": True}), progress=False)


def test_the_cli_flag(tiny_teacher, tmp_path):
    import yaml
    from click.testing import CliRunner

    from logitcache.cli import main

    config = make_config(tiny_teacher, tmp_path / "s", "topk", **{"corpus.max_tokens": 16 * 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()))
    result = CliRunner().invoke(main, ["capture", "--config", str(tmp_path / "c.yaml"), "--label-logprobs", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "s").header.identity["store"]["label_logprobs"] is True
    assert all(t.label_logprobs is not None for _, _, t in iter_sequences(tmp_path / "s"))


def with_labels(rows, seed: int):
    """``rows`` whose targets also carry label log-probabilities: random, with 0 and tiny extremes."""
    gen = np.random.default_rng(seed)
    out = []
    for seq_id, tokens, t in rows:
        lp = -gen.exponential(3.0, t.num_positions)
        lp[:2] = [0.0, -1e-30][: lp.size]
        out.append((seq_id, tokens, dataclasses.replace(t, label_logprobs=torch.from_numpy(lp).float())))
    return out


def labelled_header(method: str, fmt: str, **kw):
    header = make_header(method, fmt, **kw)
    enc = dataclasses.replace(header.store.encoding, label_logprobs=True)
    return dataclasses.replace(header, store=dataclasses.replace(header.store, encoding=enc))


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
@pytest.mark.parametrize("method", ["topk", "sample", "hybrid", "full"])
def test_round_trip_every_method_id_code_entropy_and_container(tmp_path, fmt, method):
    for ids in ("rank-delta", "packed"):
        for entropy in ("zstd", "ans"):
            rows = with_labels(make_rows(method, 5, 7, seed=3, weighted=method == "sample"), seed=4)
            header = labelled_header(method, fmt, sequences=5, per_shard=2, ids=ids, entropy=entropy, seq_len=7,
                                     weighted=method == "sample", order=tuple(range(VOCAB)))
            root = tmp_path / f"{ids}-{entropy}"
            write_store(str(root), header, rows)
            assert verify_store(root).ok
            back = list(iter_sequences(root))
            assert [s for s, _, _ in back] == [s for s, _, _ in rows]
            for (_, _, a), (_, _, b) in zip(rows, back):
                assert_equal(b, canonical(a))  # every field in decode order (ties by id), label_logprobs bit for bit
    copy = tmp_path / "converted"
    convert(str(root), str(copy), format="arrow" if fmt == "zarr" else "zarr", ids="rank-delta", entropy="zstd")
    assert read_manifest(copy).header.store.encoding.label_logprobs
    for (_, _, a), (_, _, b) in zip(rows, iter_sequences(copy)):
        assert torch.equal(b.label_logprobs, a.label_logprobs)


def test_documents_rows_keep_them_compact():
    enc = Encoding(ids="packed", vocab_size=VOCAB, label_logprobs=True)
    (_, tokens, t), = with_labels(make_rows("sample", 1, 3, seed=5), seed=6)  # three trained positions
    tokens = np.concatenate([tokens, [1, 2]]).astype(np.int32)
    mask = np.array([True, False, True, False, True])
    row = encode_row(enc, tokens, t, mask)
    _, back = decode_row(enc, "sample", t.num_samples, 0, {k: np.frombuffer(v, np.uint8) for k, v in row.columns.items()})
    assert torch.equal(back.label_logprobs, t.label_logprobs)


def test_mismatches_and_bad_values_are_refused():
    (_, tokens, t), = make_rows("topk", 1, 4, seed=7)
    plain, labelled = Encoding(vocab_size=VOCAB, ids="packed"), Encoding(vocab_size=VOCAB, ids="packed",
                                                                           label_logprobs=True)
    with pytest.raises(TargetsError, match="carry no label_logprobs"):
        encode_row(labelled, tokens, t)
    with_lp = dataclasses.replace(t, label_logprobs=torch.tensor([-1.0, -2.0, 0.5, -3.0]))
    with pytest.raises(TargetsError, match="does not keep them"):
        encode_row(plain, tokens, with_lp)
    with pytest.raises(TargetsError, match=r"label_logprobs\[2\] = 0.5"):
        encode_row(labelled, tokens, with_lp)
    with pytest.raises(TargetsError, match=r"expected a float tensor of shape \[4\]"):
        dataclasses.replace(t, label_logprobs=torch.zeros(3))
    good = dataclasses.replace(t, label_logprobs=torch.tensor([-1.0, -2.0, -0.5, -3.0]))
    columns = {k: np.frombuffer(v, np.uint8).copy() for k, v in encode_row(labelled, tokens, good).columns.items()}
    columns["label_logprob"][-4:] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)[::-1][:1].repeat(4)
    with pytest.raises(CorruptShardError, match="no log-probability"):
        decode_row(labelled, "topk", 0, 4, columns)
    columns["label_logprob"] = columns["label_logprob"][:-1]
    with pytest.raises(CorruptShardError, match="15 bytes; 16 expected"):
        decode_row(labelled, "topk", 0, 4, columns)


def test_encoding_versions():
    """Version 4 exactly when the key is there: an older reader refuses such a store; this one refuses a
    mismatched pair either way."""
    enc = Encoding(vocab_size=VOCAB, ids="packed", entropy="ans", label_logprobs=True)
    d = enc.to_manifest()
    assert d["version"] == 4 and d["entropy"] == "ans" and Encoding.from_manifest(d) == enc
    with pytest.raises(CorruptShardError, match="reads version 2 \\(zstd\\), 3 \\(ans\\) and 4"):
        Encoding.from_manifest({**d, "version": 3})
    with pytest.raises(CorruptShardError, match="label_logprobs False"):
        Encoding.from_manifest({k: v for k, v in d.items() if k != "label_logprobs"})


def test_label_logprobs_function_checks_its_labels():
    logits = torch.randn(3, 10, dtype=torch.float64)
    lp = label_logprobs(logits, torch.tensor([0, 9, 4]))
    assert torch.allclose(lp.double(), torch.log_softmax(logits, -1)[[0, 1, 2], [0, 9, 4]], atol=1e-6)
    with pytest.raises(TargetsError, match=r"ids in \[0, 10\); found shape \[3\], values in \[0, 10\]"):
        label_logprobs(logits, torch.tensor([0, 10, 4]))
    with pytest.raises(TargetsError, match=r"found shape \[2\]"):
        label_logprobs(logits, torch.tensor([0, 1]))
