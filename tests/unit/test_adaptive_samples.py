"""Adaptive sample budgets (``--sample-allocation variance``): the allocation, unbiasedness with per-position N,
capture invariance and resume, the store column and what ``inspect`` reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import SEQ_LEN, cli_args, make_config
from logitcache.capture import capture
from logitcache.capture.budget import allocate, draw_uniforms, sequence_targets
from logitcache.capture.config import SparsifyConfig
from logitcache.capture.sparsify import hybrid, sample
from logitcache.cli import main
from logitcache.errors import ConfigError, CorruptShardError, StoreError, StoreMismatchError, TargetsError
from logitcache.store import inspect_store, iter_sequences, read_manifest, verify_store
from logitcache.store.encoding import Encoding, encode_row
from logitcache.store.row_decode import decode_row
from logitcache.store.manifest import Manifest
from logitcache.testing.crash import tree_bytes
from logitcache.testing.targets import assert_equal, build_hybrid, build_sample
from logitcache.train.collate import collate
from logitcache.train.losses import full_kd_loss, kd_loss

VARIANCE = {"sparsify.allocation": "variance"}


@pytest.fixture(scope="module")
def sharp_teacher(tiny_teacher, tmp_path_factory) -> str:
    """The tiny teacher with its output head scaled by 30: confident at some positions, broad at others (the
    tiny teacher itself is near uniform, so every position would get the same budget)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp_teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def stores(sharp_teacher, tmp_path_factory):
    """One adaptive store per method (batch of 4 windows) and a fixed-budget sample store."""
    root = tmp_path_factory.mktemp("adaptive")
    out = {}
    for name, method, over in (("sample", "sample", VARIANCE), ("hybrid", "hybrid", VARIANCE),
                               ("fixed", "sample", {})):
        config = make_config(sharp_teacher, root / name, method, batch_tokens=4 * (SEQ_LEN + 1), **over)
        capture(config, progress=False)
        out[name] = config
    return out


def logits_of_varied_sharpness(t: int, v: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, v, generator=g) * torch.linspace(0.3, 6.0, t)[:, None]


def adaptive(method: str, logits: torch.Tensor, n: int, seed: int, chunk: int | None = None, k: int = 4):
    """``method``'s targets of one sequence with an adaptive budget of mean ``n``, sparsified in chunks."""
    cfg = SparsifyConfig(method=method, samples=n, k=k, allocation="variance")
    u = draw_uniforms(seed, 7, logits.shape[0], cfg.max_samples)
    step = chunk or logits.shape[0]
    parts = [sample(logits[a:a + step], cfg.max_samples, 1.0, u[a:a + step], True) if method == "sample" else
             hybrid(logits[a:a + step], k, cfg.max_samples, u[a:a + step], True)
             for a in range(0, logits.shape[0], step)]
    return sequence_targets(parts, n)


def dense(st, v: int) -> torch.Tensor:
    offsets, ids, probs = st.estimate()
    rows = torch.repeat_interleave(torch.arange(st.num_positions), offsets.diff())
    return torch.zeros(st.num_positions, v, dtype=torch.float64).index_put_((rows, ids), probs.double(),
                                                                            accumulate=True)


def tail_variance(p: torch.Tensor, k: int) -> torch.Tensor:
    """``m² (1 − Σ q²)`` of the renormalised tail outside the top ``k`` (the reference for hybrid)."""
    tail = p.scatter(1, p.topk(k, dim=1).indices, 0.0)
    m = tail.sum(1)
    return m**2 * (1 - ((tail / m[:, None]) ** 2).sum(1))


# ----------------------------------------------------------------------------- the allocation


def greedy_optimum(v: torch.Tensor, mean: int, cap: int) -> torch.Tensor:
    """The integer minimiser of Σ V_t / N_t (1 <= N_t <= cap, Σ N_t = mean·T): one draw at a time to the position
    whose V/N drops most (the objective is separable and convex, so greedy is exact). An independent reference."""
    n = torch.ones(v.numel(), dtype=torch.float64)
    for _ in range(mean * v.numel() - v.numel()):
        gain = torch.where(n < cap, v / (n * (n + 1)), -1.0)
        n[int(gain.argmax())] += 1
    return n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_spends_the_budget_where_the_variance_is(seed):
    """Σ N_t = N·T exactly, 1 <= N_t <= cap, and Σ V/N_t within 0.5% of the integer optimum; N_t ∝ V (the
    tempting wrong rule) and fixed N both leave more."""
    p = torch.softmax(logits_of_varied_sharpness(64, 200, seed).double(), -1)
    v, mean, cap = 1 - (p**2).sum(1), 20, 80
    n = allocate(v, mean, cap)
    assert int(n.sum()) == mean * 64 and int(n.min()) >= 1 and int(n.max()) <= cap
    objective = float((v / n).sum())
    best = float((v / greedy_optimum(v, mean, cap)).sum())
    assert objective <= 1.005 * best
    proportional = (v / v.sum() * mean * 64).clamp(1, cap)
    assert objective < float((v / proportional).sum()) and objective < float((v / mean).sum())
    assert torch.equal(allocate(v.clone(), mean, cap), n)  # a pure function of the variances


def test_allocation_edge_cases():
    assert torch.equal(allocate(torch.zeros(5, dtype=torch.float64), 7, 28), torch.full((5,), 7, dtype=torch.int32))
    # one broad position saturates at the cap; the seven certain ones share the rest evenly (largest remainder)
    n = allocate(torch.tensor([0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64), 10, 40)
    assert n.tolist() == [6, 6, 40, 6, 6, 6, 5, 5] and int(n.sum()) == 80
    assert allocate(torch.full((3,), 0.5, dtype=torch.float64), 5, 20).tolist() == [5, 5, 5]
    assert allocate(torch.zeros(0, dtype=torch.float64), 5, 20).numel() == 0
    with pytest.raises(ConfigError, match="1 <= mean draws <= cap"):
        allocate(torch.ones(3, dtype=torch.float64), 30, 20)


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("method", ["sample", "hybrid"])
def test_sampler_is_unbiased_with_per_position_budgets(method):
    """Mean over 800 seeds of t̂ equals p within 5 standard errors of each position's *own* N_t (plus 1e-4),
    the budget is the same for every seed (a function of p alone) and its variance is the reference's."""
    v, n, k, reps = 48, 12, 4, 800
    x = logits_of_varied_sharpness(6, v, seed=5)
    p = torch.softmax(x.double(), -1)
    runs = [adaptive(method, x, n, seed, chunk=4, k=k) for seed in range(reps)]
    totals = runs[0].sample_totals
    assert all(torch.equal(r.sample_totals, totals) for r in runs) and int(totals.sum()) == n * 6
    assert len(set(totals.tolist())) > 2  # the budgets really differ between positions
    mean = torch.stack([dense(r, v) for r in runs]).mean(0)
    if method == "sample":
        var = p * (1 - p)
        assert torch.equal(totals, allocate(1 - (p**2).sum(1), n, 4 * n))
    else:
        head = p.topk(k, dim=1).indices
        m = 1 - p.gather(1, head).sum(1, keepdim=True)
        var = (p * (m - p)).scatter(1, head, 0.0)  # m² r(1 − r), r = p/m
        assert torch.equal(totals, allocate(tail_variance(p, k), n, 4 * n))
    se = torch.sqrt(var / totals[:, None].double() / reps)
    assert ((mean - p).abs() <= 5 * se + 1e-4).all(), float(((mean - p).abs() / (se + 1e-12)).max())


def test_kd_gradient_is_unbiased_with_per_position_budgets():
    """The KD gradient (``kd_loss``, α = 1, through collate and estimate()) averaged over 400 seeds equals the
    full-KD gradient on the dense teacher within 5 standard errors from each position's own N_t."""
    v, n, t, reps = 40, 10, 8, 400
    x = logits_of_varied_sharpness(t, v, seed=9)
    p = torch.softmax(x.double(), -1)
    z = torch.randn(1, t, v, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(2))[:, 0]

    def grad(loss_of) -> torch.Tensor:
        zz = z.clone().requires_grad_()
        loss_of(zz).backward()
        return zz.grad[0]

    expected = grad(lambda zz: full_kd_loss(zz, x.double().log_softmax(-1)[None]))
    grads, totals = [], None
    for seed in range(reps):
        st = adaptive("sample", x, n, seed)
        totals = st.sample_totals
        batch = collate([{"seq_id": 0, "input_ids": torch.zeros(t, dtype=torch.long), "labels": labels,
                          "targets": st}])
        grads.append(grad(lambda zz: kd_loss(zz, batch, alpha=1.0, kind="sparse")))
    se = torch.sqrt(p * (1 - p) / totals[:, None].double() / reps) / t
    error = (torch.stack(grads).mean(0) - expected).abs()
    assert (error <= 5 * se + 1e-6).all(), float((error / (se + 1e-12)).max())


def test_chunks_join_into_the_whole_sequence():
    x = logits_of_varied_sharpness(37, 90, seed=3)
    for method in ("sample", "hybrid"):
        whole = adaptive(method, x, 9, seed=4)
        assert_equal(adaptive(method, x, 9, seed=4, chunk=5), whole)
        assert int(whole.sample_totals.sum()) == 9 * 37


# ----------------------------------------------------------------------------- capture


@pytest.mark.parametrize(("batch_windows", "threads"), [(1, 1), (7, 3)])
def test_batch_size_and_threads_change_no_byte(stores, sharp_teacher, tmp_path, batch_windows, threads):
    for name in ("sample", "hybrid"):
        ref = stores[name]
        config = make_config(sharp_teacher, tmp_path / name, ref.sparsify.method,
                             batch_tokens=batch_windows * (SEQ_LEN + 1), encode_threads=threads, **VARIANCE)
        capture(config, progress=False)
        assert tree_bytes(tmp_path / name) == tree_bytes(Path(ref.store.path))


def test_sigkill_then_resume_is_byte_identical(stores, tmp_path):
    ref = stores["sample"]
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "logitcache.cli",
           *cli_args(ref.with_overrides({"store.path": str(out), "batch_tokens": 2 * (SEQ_LEN + 1)})),
           "--sample-allocation", "variance"]
    killed = subprocess.run(cmd, env=dict(os.environ, LOGITCACHE_FAULT="after_commit:1"), capture_output=True,
                            text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert verify_store(out).ok and not inspect_store(out)["complete"]
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0 and "already committed" in resumed.stderr, resumed.stderr
    assert tree_bytes(out) == tree_bytes(Path(ref.store.path))


def test_a_resume_with_another_allocation_is_refused(stores, tmp_path):
    out = tmp_path / "s"
    fixed = stores["fixed"].with_overrides({"store.path": str(out)})
    capture(fixed, progress=False)
    before = tree_bytes(out)
    with pytest.raises(StoreMismatchError, match="identity.sparsify.allocation: store has None, this run has "
                                                 "'variance'"):
        capture(fixed.with_overrides(VARIANCE), progress=False)
    assert tree_bytes(out) == before


def test_stores_record_the_budget_and_every_container_reads_it_back(stores, tmp_path):
    """The manifest names the allocation and encoding version 5; every row's draws sum to N·T with its counts
    summing to each N_t; zarr and the ans stage hold the same targets; verify passes."""
    ref = stores["sample"]
    header = read_manifest(ref.store.path).to_dict()
    assert header["params"] == {"samples": 20, "temperature": 1.0, "allocation": "variance"}
    assert header["store"]["encoding"]["version"] == 5 and header["store"]["encoding"]["sample_totals"] is True
    rows = list(iter_sequences(ref.store.path))
    for _, _, t in rows:
        assert int(t.sample_totals.sum()) == 20 * SEQ_LEN
        seg = torch.repeat_interleave(torch.arange(SEQ_LEN), t.sample_lengths.long())
        assert torch.equal(torch.zeros(SEQ_LEN, dtype=torch.long).index_add_(0, seg, t.sample_counts.long()),
                           t.sample_totals.long())
    for name in ("sample", "hybrid"):
        for over in ({"store.format": "zarr"}, {"store.entropy": "ans"}):
            out = tmp_path / f"{name}-{'-'.join(over.values())}"
            capture(stores[name].with_overrides({"store.path": str(out), **over}), progress=False)
            assert verify_store(out).ok
            for (sa, ta, xa), (sb, tb, xb) in zip(iter_sequences(out), iter_sequences(stores[name].store.path),
                                                   strict=True):
                assert sa == sb and np.array_equal(ta, tb)
                assert_equal(xa, xb)


def test_inspect_reports_the_distribution_from_the_manifest(stores):
    ref = stores["hybrid"]
    totals = torch.cat([t.sample_totals for _, _, t in iter_sequences(ref.store.path)]).numpy()
    summary = inspect_store(ref.store.path)["sample_totals"]
    expected = {"min": int(totals.min()), "max": int(totals.max()), "mean": 20.0,
                **{f"p{q}": int(np.quantile(totals, q / 100, method="inverted_cdf")) for q in (10, 50, 90)}}
    assert summary == pytest.approx(expected) and summary["max"] > 20 > summary["min"]
    result = CliRunner().invoke(main, ["inspect", ref.store.path])
    assert result.exit_code == 0, result.output
    assert (f"draws/position   min {expected['min']}  p10 {expected['p10']}  median {expected['p50']}  mean 20.00  "
            f"p90 {expected['p90']}  max {expected['max']}") in result.output
    shards = json.loads((Path(ref.store.path) / "manifest.json").read_text())["shards"]
    assert all(sum(s["sample_totals"]) == s["positions"] for s in shards)


def test_fixed_budget_stores_keep_their_format(stores):
    """No allocation parameter, no sample_totals anywhere, encoding version 2 (the byte-for-byte comparison with
    stores captured before this feature is in the report of the change)."""
    manifest = read_manifest(stores["fixed"].store.path).to_dict()
    assert manifest["params"] == {"samples": 20, "temperature": 1.0} and "allocation" not in manifest["identity"][
        "sparsify"]
    assert manifest["store"]["encoding"]["version"] == 2 and "sample_totals" not in manifest["store"]["encoding"]
    assert all("sample_totals" not in s for s in manifest["shards"])
    assert "sample_totals" not in inspect_store(stores["fixed"].store.path)
    assert all(t.sample_totals is None for _, _, t in iter_sequences(stores["fixed"].store.path))


# ----------------------------------------------------------------------------- refusals


def encoded_row(totals: list[int], n: int = 6):
    t = torch.softmax(logits_of_varied_sharpness(len(totals), 30, seed=1).double(), -1)
    gen = torch.Generator().manual_seed(0)
    targets = build_sample(t, n, gen, totals=torch.tensor(totals))
    tokens = np.concatenate([[0], torch.multinomial(t, 1, generator=gen)[:, 0].numpy()]).astype(np.int32)
    enc = Encoding(ids="packed", vocab_size=30, sample_totals=True)
    return enc, tokens, targets, {k: np.frombuffer(v, np.uint8) for k, v in encode_row(enc, tokens, targets).columns.items()}


def test_damaged_or_inconsistent_totals_are_refused():
    enc, tokens, targets, columns = encoded_row([1, 3, 12, 8])
    assert_equal(decode_row(enc, "sample", 6, 0, columns)[1], targets)
    for values, message in (([0, 4, 12, 8], "at position 0 is 0; expected 1 to 24"),
                            ([2, 3, 12, 8], "sum to 25 over 4 positions; expected N·T = 6 × 4 = 24"),
                            ([3, 1, 12, 8], "sample count below 1|sample counts sum to")):
        bad = {**columns, "sample_totals": np.array(values, np.uint8)}
        with pytest.raises(CorruptShardError, match=message):
            decode_row(enc, "sample", 6, 0, bad)
    with pytest.raises(CorruptShardError, match="column holds 3 bytes; 4 expected"):
        decode_row(enc, "sample", 6, 0, {**columns, "sample_totals": columns["sample_totals"][:3]})
    with pytest.raises(TargetsError, match="sample_totals sum to 25"):
        encode_row(enc, tokens, targets.__class__(**{**targets.__dict__, "sample_totals": torch.tensor([2, 3, 12, 8])}))
    with pytest.raises(TargetsError, match="store's encoding has no sample_totals column"):
        encode_row(Encoding(ids="packed", vocab_size=30), tokens, targets)
    with pytest.raises(TargetsError, match="sample_totals is torch.int64\\[3\\]; expected an integer tensor of shape "
                                           "\\[4\\]"):
        targets.__class__(**{**targets.__dict__, "sample_totals": torch.tensor([1, 2, 3])})
    t = torch.softmax(logits_of_varied_sharpness(4, 30).double(), -1)
    hybrid_targets = build_hybrid(t, 3, 6, torch.Generator(), totals=torch.tensor([6, 6, 6, 6]))
    assert int(hybrid_targets.sample_counts.sum()) == 24


def test_a_manifest_whose_budget_and_rows_disagree_is_refused(stores):
    d = read_manifest(stores["sample"].store.path).to_dict()
    d["store"]["encoding"] = {k: v for k, v in d["store"]["encoding"].items() if k != "sample_totals"} | {"version": 2}
    from logitcache.store.manifest import with_header_digest

    d = with_header_digest({k: v for k, v in d.items() if k not in ("header_sha256", "shards", "complete")}) | {
        "shards": d["shards"], "complete": d["complete"]}
    with pytest.raises(StoreError, match="store.encoding.sample_totals is False; expected True with params.allocation "
                                         "'variance'"):
        Manifest.from_dict(d)


def test_settings_an_adaptive_budget_cannot_take_are_refused(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="method 'topk' draws none"):
        SparsifyConfig(method="topk", allocation="variance")
    with pytest.raises(ConfigError, match="samples at temperature 1 .* found temperature=0.8"):
        SparsifyConfig(method="sample", temperature=0.8, allocation="variance")
    with pytest.raises(ConfigError, match="allocation must be fixed or variance; found 'entropy'"):
        SparsifyConfig(allocation="entropy")
    with pytest.raises(ConfigError, match=r"the ans entropy stage codes up to 4095 .*\(at most 8000 a position\)"):
        make_config(tiny_teacher, tmp_path, "sample", **{"sparsify.samples": 2000, "store.entropy": "ans"}, **VARIANCE)
    result = CliRunner().invoke(main, cli_args(make_config(tiny_teacher, tmp_path / "c", "topk"))
                                + ["--sample-allocation", "variance"])
    assert isinstance(result.exception, ConfigError) and "draws none" in str(result.exception)
