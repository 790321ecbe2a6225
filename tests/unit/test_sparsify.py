"""Unit tests of logitcache.capture.sparsify against dense references and Monte-Carlo bounds."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICES

from logitcache.capture.config import SparsifyConfig
from logitcache.errors import ConfigError, TargetsError
from logitcache.capture.sparsify import draw_uniforms, full, hybrid, sample, sequence_seed, sparsify, topk

NEG_INF = float("-inf")


def make_logits(t: int, v: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, v, generator=g) * 3
    spikes = torch.randint(0, v, (t,), generator=g)
    x[torch.arange(t), spikes] += 8
    return x.to(dtype)


def est(st, v: int) -> torch.Tensor:
    """Dense float64[T, V] of SparseTargets.estimate()."""
    offsets, ids, probs = st.estimate()
    rows = torch.repeat_interleave(torch.arange(st.num_positions), offsets.diff())
    dense = torch.zeros(st.num_positions, v, dtype=torch.float64)
    return dense.index_put_((rows, ids), probs.double(), accumulate=True)


def ragged(st):
    """Per-position python lists of (ids, counts) for the sample part."""
    off = st.sample_offsets()
    return [(st.sample_ids[off[i] : off[i + 1]], st.sample_counts[off[i] : off[i + 1]]) for i in range(len(off) - 1)]


# ----------------------------------------------------------------------------- top-k / full


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 64, 123, 500])
@pytest.mark.parametrize("v", [123, 3000, 4096])
def test_topk_matches_dense_reference(k, v, device):
    x = make_logits(47, v, seed=k + v)
    st = topk(x.to(device), k).to("cpu")
    kk = min(k, v)
    ref = torch.log_softmax(x.double(), -1)
    ref_vals, _ = ref.sort(-1, descending=True)
    assert st.head_ids.dtype == torch.int32 and st.head_ids.shape == (47, kk)
    assert st.head_logprobs.dtype == torch.float32 and st.tail_mass.dtype == torch.float32
    # ids give the reference log-probs, in descending order, and are the top-k values
    torch.testing.assert_close(st.head_logprobs.double(), ref.gather(1, st.head_ids.long()), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.head_logprobs.double(), ref_vals[:, :kk], atol=1e-5, rtol=0)
    assert (st.head_ids.long().sort(1).values.diff(dim=1) > 0).all()  # distinct
    tail_ref = 1 - ref_vals[:, :kk].exp().sum(-1)
    torch.testing.assert_close(st.tail_mass.double(), tail_ref.clamp(min=0), atol=1e-6, rtol=0)


def test_topk_bf16_input():
    x = make_logits(33, 3000, dtype=torch.bfloat16)
    st = topk(x, 16)
    ref = torch.log_softmax(x.float(), -1)
    torch.testing.assert_close(st.head_logprobs, ref.gather(1, st.head_ids.long()), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.head_logprobs, ref.sort(-1, descending=True).values[:, :16], atol=1e-5, rtol=0)


def test_topk_tiny_tail_is_exact_and_positive():
    x = torch.full((4, 500), -60.0)
    x[:, 0] = 0.0
    x[1, 1:] = -80.0  # 499·e^-80 ≈ 9e-33: still a normal float32
    x[2, 1:] = NEG_INF
    st = topk(x, 1)
    expected = torch.tensor([499 * math.exp(-60), 499 * math.exp(-80), 0.0, 499 * math.exp(-60)], dtype=torch.float64)
    expected = expected / (1 + expected)
    torch.testing.assert_close(st.tail_mass.double(), expected, rtol=1e-5, atol=0)
    assert (st.tail_mass[[0, 1, 3]] > 0).all() and st.tail_mass[2] == 0


def test_topk_rows_with_few_finite_logits():
    x = make_logits(20, 4096)
    x[3, :] = NEG_INF
    x[3, [5, 700, 4095]] = torch.tensor([1.0, 2.0, 3.0])
    st = topk(x, 8)
    assert st.head_ids[3, :3].tolist() == [4095, 700, 5]
    assert torch.isneginf(st.head_logprobs[3, 3:]).all()
    assert len(set(st.head_ids[3].tolist())) == 8 and st.tail_mass[3] == 0


def test_full_is_dense_log_softmax():
    x = make_logits(9, 123)
    st = full(x)
    assert st.method == "full" and st.head_ids.shape == (9, 123)
    ref = torch.log_softmax(x, -1)
    torch.testing.assert_close(st.head_logprobs, ref.sort(-1, descending=True).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.head_logprobs, ref.gather(1, st.head_ids.long()), atol=1e-5, rtol=0)
    assert (st.tail_mass == 0).all()
    torch.testing.assert_close(est(st, 123), torch.softmax(x.double(), -1), atol=1e-6, rtol=0)


def test_topk_estimate_matches_dense():
    x = make_logits(11, 300)
    st = topk(x, 7)
    p = torch.softmax(x.double(), -1)
    mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(7, -1).indices, True)
    torch.testing.assert_close(est(st, 300), p * mask, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- sample


def test_sample_structure_and_neg_inf_never_drawn():
    x = make_logits(200, 123)
    x[:, ::2] = NEG_INF
    x[:, 0] = 5.0  # one finite even id
    u = draw_uniforms(1, 2, 200, 50)
    st = sample(x, 50, 1.0, u)
    assert st.sample_ids.dtype == st.sample_counts.dtype == st.sample_lengths.dtype == torch.int32
    assert st.num_samples == 50 and st.sample_weights is None and st.head_ids is None
    for ids, counts in ragged(st):
        assert int(counts.sum()) == 50 and (counts > 0).all()
        assert (ids.diff() > 0).all()
    drawn = st.sample_ids.long()
    assert ((drawn % 2 == 1) | (drawn == 0)).all()
    assert int(st.sample_lengths.sum()) == st.sample_ids.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [1.0, 0.7, 1.5])
def test_sample_is_unbiased_monte_carlo(tau, device):
    v, n, reps = 40, 50, 4000
    x = make_logits(1, v, seed=3)[0]
    x[7] = NEG_INF
    p = torch.softmax(x.double(), -1)
    q = torch.softmax(x.double() / tau, -1)
    st = sample(x.expand(reps, v).contiguous().to(device), n, tau, draw_uniforms(5, 9, reps, n)).to("cpu")
    dense = est(st, v)
    assert (dense[:, 7] == 0).all()
    w = p / q.clamp(min=1e-300)
    # per-row estimator t̂_i = (c_i / N) w_i has variance w_i^2 q_i (1 - q_i) / N
    se = torch.sqrt(w**2 * q * (1 - q) / n / reps)
    assert ((dense.mean(0) - p).abs() <= 5 * se + 1e-4).all()
    # draw frequencies match q itself
    freq = torch.zeros(v, dtype=torch.float64).index_add_(0, st.sample_ids.long(), st.sample_counts.double())
    freq /= n * reps
    assert ((freq - q).abs() <= 5 * torch.sqrt(q * (1 - q) / (n * reps)) + 1e-5).all()
    if tau != 1.0:
        assert st.sample_weights is not None and torch.isfinite(st.sample_weights).all()


def test_sample_spiky_distribution_frequencies():
    """A dominant id and many tiny ones: q must be reproduced at ~1e-4 absolute with no absorption."""
    v, n, reps = 4096, 64, 3000
    x = torch.full((v,), -9.0)
    x[1234] = 3.0
    x[4000:] = -4.0
    p = torch.softmax(x.double(), -1)
    st = sample(x.expand(reps, v).contiguous(), n, 1.0, draw_uniforms(0, 1, reps, n))
    freq = torch.zeros(v, dtype=torch.float64).index_add_(0, st.sample_ids.long(), st.sample_counts.double())
    freq /= n * reps
    se = torch.sqrt(p * (1 - p) / (n * reps))
    assert abs(freq[:4000].sum() - p[:4000].sum()) <= 5 * se[:4000].pow(2).sum().sqrt() + 1e-5
    assert ((freq - p).abs() <= 5 * se + 1e-5).all()


def test_sample_estimate_matches_fields():
    x = make_logits(13, 123)
    st = sample(x, 20, 0.8, draw_uniforms(0, 0, 13, 20))
    p = torch.softmax(x.double(), -1)
    q = torch.softmax(x.double() / 0.8, -1)
    dense = torch.zeros(13, 123, dtype=torch.float64)
    for row, (ids, counts) in enumerate(ragged(st)):
        dense[row, ids.long()] = counts.double() / 20 * (p[row, ids.long()] / q[row, ids.long()])
    torch.testing.assert_close(est(st, 123), dense, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- hybrid


def test_hybrid_head_exact_and_tail_disjoint():
    x = make_logits(47, 3000)
    x[:, 100:200] = NEG_INF
    st = hybrid(x, 8, 50, draw_uniforms(0, 3, 47, 50))
    ref = topk(x, 8)
    assert torch.equal(st.head_ids, ref.head_ids) and torch.equal(st.head_logprobs, ref.head_logprobs)
    assert torch.equal(st.tail_mass, ref.tail_mass)
    for row, (ids, counts) in enumerate(ragged(st)):
        assert int(counts.sum()) == 50 and (ids.diff() > 0).all()
        assert not set(ids.tolist()) & set(st.head_ids[row].tolist())
        assert not ((ids >= 100) & (ids < 200)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_hybrid_tail_is_unbiased_monte_carlo(device):
    v, k, n, reps = 60, 5, 20, 4000
    x = make_logits(1, v, seed=11)[0]
    p = torch.softmax(x.double(), -1)
    st = hybrid(x.expand(reps, v).contiguous().to(device), k, n, draw_uniforms(2, 4, reps, n)).to("cpu")
    dense = est(st, v)
    head = p.topk(k).indices
    m = 1 - p[head].sum()
    r = p / m
    se = m * torch.sqrt(r * (1 - r) / n / reps)
    se[head] = 0
    assert ((dense.mean(0) - p).abs() <= 5 * se + 1e-6).all()
    assert abs(float(dense.sum(1).mean()) - 1) < 1e-3
    torch.testing.assert_close(dense.sum(1), torch.ones(reps, dtype=torch.float64), atol=1e-5, rtol=0)


def test_hybrid_no_tail_cases():
    x = make_logits(5, 10)
    st = hybrid(x, 10, 7, draw_uniforms(0, 0, 5, 7))
    assert (st.sample_lengths == 0).all() and st.sample_ids.numel() == 0 and (st.tail_mass == 0).all()
    x[:, 3:] = NEG_INF
    st = hybrid(x, 3, 7, draw_uniforms(0, 0, 5, 7))
    assert (st.sample_lengths == 0).all() and st.head_ids.shape == (5, 3)
    torch.testing.assert_close(est(st, 10), torch.softmax(x.double(), -1), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- invariance, determinism


def _fields(st):
    names = ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids", "sample_counts", "sample_weights")
    return {n: getattr(st, n) for n in names}


def _split(st, a, b):
    """Rows [a:b] of a SparseTargets (ragged sample arrays cut by offsets)."""
    out = {}
    for n, t in _fields(st).items():
        if t is None:
            out[n] = None
        elif n in ("sample_ids", "sample_counts", "sample_weights"):
            off = st.sample_offsets()
            out[n] = t[off[a] : off[b]]
        else:
            out[n] = t[a:b]
    return out


@pytest.mark.parametrize("v", [3000, 4096])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x, u: topk(x, 8),
        lambda x, u: full(x),
        lambda x, u: sample(x, 30, 1.0, u),
        lambda x, u: sample(x, 30, 0.7, u),
        lambda x, u: hybrid(x, 8, 30, u),
    ],
    ids=["topk", "full", "sample", "sample_tau", "hybrid"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_invariance_and_determinism(fn, v, dtype):
    x = make_logits(47, v, dtype=dtype)
    u = draw_uniforms(0, 5, 47, 30)
    whole = fn(x, u)
    again = fn(x.clone(), u.clone())
    for n, t in _fields(whole).items():
        assert (t is None and getattr(again, n) is None) or torch.equal(t, getattr(again, n)), n
    for a, b in [(0, 5), (5, 21), (21, 22), (22, 47)]:
        part = fn(x[a:b], u[a:b])
        for n, t in _split(whole, a, b).items():
            got = getattr(part, n)
            assert (t is None and got is None) or torch.equal(t, got), (n, a, b)


def test_draw_uniforms_keys():
    u = draw_uniforms(1, 2, 100, 50)
    assert u.dtype == torch.float64 and u.shape == (100, 50)
    assert (u >= 0).all() and (u < 1).all()
    assert torch.equal(u, draw_uniforms(1, 2, 100, 50))
    assert not torch.equal(u, draw_uniforms(1, 3, 100, 50))
    assert not torch.equal(u, draw_uniforms(2, 2, 100, 50))
    torch.manual_seed(123)  # the global RNG is not part of the key
    assert torch.equal(u, draw_uniforms(1, 2, 100, 50))
    # row t depends on (seed, seq_id, t, N) only, not on T
    assert torch.equal(u[:10], draw_uniforms(1, 2, 10, 50))
    assert torch.equal(u[:70], draw_uniforms(1, 2, 70, 50))
    assert len({tuple(r.tolist()) for r in u}) == 100
    assert sequence_seed(1, 2) == sequence_seed(1, 2) != sequence_seed(2, 1)
    assert 0 <= sequence_seed(10**12, 10**12) < 2**63
    assert draw_uniforms(0, 0, 0, 5).shape == (0, 5)


def test_sparsify_dispatch():
    x = make_logits(6, 200)
    u = draw_uniforms(0, 0, 6, 10)
    for cfg, method in [
        (SparsifyConfig("topk", k=4), "topk"),
        (SparsifyConfig("sample", samples=10, temperature=1.2), "sample"),
        (SparsifyConfig("hybrid", k=4, samples=10), "hybrid"),
        (SparsifyConfig("full"), "full"),
    ]:
        st = sparsify(x, cfg, u if method in ("sample", "hybrid") else None)
        assert st.method == method
    assert torch.equal(sparsify(x, SparsifyConfig("hybrid", k=4, samples=10), u).sample_ids,
                       hybrid(x, 4, 10, u).sample_ids)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, pattern, error",
    [
        (lambda: topk(torch.zeros(5), 2), "found shape \\[5\\]", TargetsError),
        (lambda: topk(torch.zeros(2, 3, 4), 2), "2-D", TargetsError),
        (lambda: topk(torch.zeros(2, 3, dtype=torch.int64), 2), "floating", TargetsError),
        (lambda: topk(torch.tensor([[0.0, float("nan")]]), 1), "row 0 contains a NaN", TargetsError),
        (lambda: sample(torch.tensor([[0.0, 1.0], [0.0, float("inf")]]), 3, 1.0, torch.zeros(2, 3, dtype=torch.float64)), "row 1 contains \\+inf", TargetsError),
        (lambda: hybrid(torch.tensor([[0.0, 1.0], [NEG_INF, NEG_INF]]), 1, 3, torch.zeros(2, 3, dtype=torch.float64)), "row 1 contains only -inf", TargetsError),
        (lambda: full(torch.tensor([[NEG_INF, NEG_INF]])), "only -inf", TargetsError),
        (lambda: sample(torch.zeros(4, 5), 3, 1.0, torch.zeros(4, 2, dtype=torch.float64)), "found \\[4, 2\\]", TargetsError),
        (lambda: hybrid(torch.zeros(4, 5), 1, 3, torch.zeros(3, 3, dtype=torch.float64)), "expected|found \\[3, 3\\]", TargetsError),
        (lambda: sample(torch.zeros(4, 5), 3, 1.0, None), "found None", TargetsError),
        (lambda: sample(torch.zeros(1, 5), 1, 1.0, torch.ones(1, 1, dtype=torch.float64)), "\\[0, 1\\)", TargetsError),
        (lambda: topk(torch.zeros(2, 3), 0), "k must be an integer >= 1; found 0", ConfigError),
    ],
)
def test_errors(call, pattern, error):
    with pytest.raises(error, match=pattern):
        call()
