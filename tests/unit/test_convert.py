"""`capture --format zarr` and `logitcache convert`: same targets in every container and encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from logitcache.capture import capture
from logitcache.cli import main
from logitcache.store.convert import convert
from logitcache.errors import ConfigError, StoreError
from logitcache.store import inspect_store, iter_sequences, verify_store
from logitcache.testing.crash import tree_bytes
from logitcache.testing.store_conformance import requires
from helpers import cli_args, make_config

needs_zarr = requires("zarr")  # only the tests that write zarr skip without it


@pytest.fixture(scope="module")
def hybrid_store(tiny_teacher, tmp_path_factory):
    config = make_config(tiny_teacher, tmp_path_factory.mktemp("conv") / "arrow", "hybrid")
    capture(config, progress=False)
    return config


def same_targets(a, b) -> None:
    for (sa, ta, xa), (sb, tb, xb) in zip(iter_sequences(a), iter_sequences(b), strict=True):
        assert sa == sb and (ta == tb).all()
        for name in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids", "sample_counts"):
            assert torch.equal(getattr(xa, name), getattr(xb, name)), name


@needs_zarr
def test_cli_capture_zarr_holds_the_same_targets_as_arrow(hybrid_store, tmp_path):
    for fmt in ("arrow", "zarr"):
        args = cli_args(hybrid_store)
        args[args.index("--out") + 1] = str(tmp_path / fmt)
        result = CliRunner().invoke(main, args + ["--format", fmt])
        assert result.exit_code == 0, result.output
    out = tmp_path / "zarr"
    assert (out / "data.zarr" / "zarr.json").is_file() and not (out / "shards").exists()
    assert verify_store(out).ok and inspect_store(out)["store_format"] == "zarr"
    same_targets(tmp_path / "arrow", out)


@needs_zarr
def test_convert_round_trip_is_byte_identical(hybrid_store, tmp_path):
    src = Path(hybrid_store.store.path)
    z = convert(str(src), str(tmp_path / "z"), format="zarr")
    assert z.sequences == inspect_store(src)["sequences"] and z.max_prob_error == 0.0
    convert(str(tmp_path / "z"), str(tmp_path / "back"), format="arrow")
    assert tree_bytes(tmp_path / "back") == tree_bytes(src)


@needs_zarr
def test_convert_through_the_ans_stage_and_back_is_byte_identical(hybrid_store, tmp_path):
    src = Path(hybrid_store.store.path)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "ans"), "--entropy", "ans",
                                       "--format", "zarr"])
    assert result.exit_code == 0, result.output
    same_targets(src, tmp_path / "ans")
    assert inspect_store(tmp_path / "ans")["encoding"]["entropy"] == "ans"
    convert(str(tmp_path / "ans"), str(tmp_path / "back"), format="arrow", entropy="zstd")
    assert tree_bytes(tmp_path / "back") == tree_bytes(src)


def test_q8_under_ans_keeps_the_tail_within_float16_rounding(hybrid_store, tmp_path):
    src = hybrid_store.store.path
    convert(src, str(tmp_path / "q8"), logprob_dtype="q8", entropy="ans")
    for (_, _, a), (_, _, b) in zip(iter_sequences(src), iter_sequences(tmp_path / "q8"), strict=True):
        err = (a.tail_mass.double() - b.tail_mass.double()).abs()
        assert bool((err <= torch.clamp(a.tail_mass.double() * 2.0 ** -11, min=2.0 ** -25)).all())
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.sample_counts, b.sample_counts)
    assert 0 < inspect_store(tmp_path / "q8")["max_prob_error"] < 2 / 255


def test_lossy_convert_reports_its_measured_error(hybrid_store, tmp_path):
    result = CliRunner().invoke(main, ["convert", hybrid_store.store.path, str(tmp_path / "q8"),
                                       "--logprob-dtype", "q8"])
    assert result.exit_code == 0, result.output
    assert "within max |Δp|" in result.output
    info = inspect_store(tmp_path / "q8")
    assert 0 < info["max_prob_error"] < 2 / 255
    assert info["bytes_on_disk"] < inspect_store(hybrid_store.store.path)["bytes_on_disk"]
    with pytest.raises(ConfigError, match="two lossy steps"):
        convert(str(tmp_path / "q8"), str(tmp_path / "f16"), logprob_dtype="float16")


def test_convert_refuses_an_incomplete_source_and_itself(hybrid_store, tmp_path):
    with pytest.raises(ConfigError, match="same store"):
        convert(hybrid_store.store.path, hybrid_store.store.path)
    partial = tmp_path / "partial"
    env = dict(os.environ, LOGITCACHE_FAULT="after_commit:1")
    args = cli_args(hybrid_store)
    args[args.index("--out") + 1] = str(partial)
    proc = subprocess.run([sys.executable, "-m", "logitcache.cli", *args], env=env, capture_output=True)
    assert proc.returncode != 0 and not json.loads((partial / "manifest.json").read_text())["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        convert(str(partial), str(tmp_path / "x"))


@needs_zarr
def test_zarr_sigkill_then_resume_is_byte_identical(hybrid_store, tmp_path):
    def run(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        args = cli_args(hybrid_store)
        args[args.index("--out") + 1] = str(out)
        env = dict(os.environ, **({"LOGITCACHE_FAULT": fault} if fault else {}))
        return subprocess.run([sys.executable, "-m", "logitcache.cli", *args, "--format", "zarr"], env=env,
                              capture_output=True)

    assert run(tmp_path / "ref").returncode == 0
    killed = run(tmp_path / "killed", "after_shard:2")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not inspect_store(tmp_path / "killed")["complete"]
    assert run(tmp_path / "killed").returncode == 0
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "ref")
