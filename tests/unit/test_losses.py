"""KD losses vs dense, obviously-correct references (values and gradients), plus Monte Carlo bias.

Tolerances: fp32 logits — loss and gradient within 1e-5 (relative and absolute) of a float64
dense reference. bf16 logits — the loss is computed in fp32 from the bf16 values, so it stays
within 1e-5 of the reference on the same (upcast) values; the gradient is returned in bf16
(8 significant bits), so it is compared with rtol 1e-2 and atol 1e-2 · max|grad|.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, make_items

from logitcache.errors import ConfigError
from logitcache.testing.targets import build_hybrid, build_sample, build_topk
from logitcache.train.collate import collate
from logitcache.train.losses import KDLoss, ghost_kd_loss, kd_loss, sparse_kd_loss
from logitcache.train.losses_chunked import ChunkedKDLoss, chunked_kd_loss

B, T, V = 3, 47, 123
LENGTHS = [47, 30, 11]
IGNORE = -100


def _teacher(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2.5 * torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1).float()


def _batch(method: str, seed: int = 0) -> dict:
    return collate(make_items(_teacher(seed), LENGTHS, method, seed=seed, k=5, n=50), ignore_index=IGNORE)


def _logits(dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(B, T, V, generator=gen)).to(dtype).requires_grad_(True)


# ---------------------------------------------------------------- dense references (float64)
def _dense(batch: dict, head_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``t̂ [B,T,V]`` and support mask by scatter (tests only)."""
    ids, probs, mask = batch["target_ids"], batch["target_probs"].double(), batch["target_mask"]
    if head_only:
        k = batch["target_head_size"]
        ids, probs, mask = ids[..., :k], probs[..., :k], mask[..., :k]
    t = torch.zeros(B, T, V, dtype=torch.float64).scatter_add_(2, ids, torch.where(mask, probs, 0.0))
    support = torch.zeros(B, T, V).scatter_add_(2, ids, mask.float()) > 0
    return t, support


def _ref_kd_tokens(z: torch.Tensor, batch: dict, kind: str, tau: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(z / tau, -1)
    p = logp.exp()
    if kind == "ghost":
        t, head = _dense(batch, head_only=True)
        m = batch["target_tail_mass"].double()
        tail_p = (p * ~head).sum(-1)
        return (torch.special.xlogy(t, t) - t * logp).sum(-1) + torch.special.xlogy(m, m) - m * tail_p.log()
    t, support = _dense(batch)
    if kind == "reverse":
        support = support & (t > 0)
        q = torch.where(support, p, 0.0)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-300)
        tn = t / t.sum(-1, keepdim=True).clamp_min(1e-300)
        one = torch.ones_like(q)  # log(1) = 0 off the support keeps the reference's gradient finite
        return (q * (torch.where(support, q, one).log() - torch.where(support, tn, one).log())).sum(-1)
    if kind == "topk_renorm":
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-300)
    return (torch.special.xlogy(t, t) - t * logp).sum(-1)


def _ref_kd_loss(z: torch.Tensor, batch: dict, kind: str, alpha: float, tau: float = 1.0) -> torch.Tensor:
    z = z.double()
    labels = batch["labels"]
    ce = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE, reduction="none").view(B, T)
    kd = _ref_kd_tokens(z, batch, kind, tau) if alpha > 0 else torch.zeros(B, T, dtype=torch.float64)
    mask = labels != IGNORE
    per = (1 - alpha) * ce + alpha * kd
    return torch.where(mask, per, 0.0).sum() / mask.sum().clamp_min(1)


def _value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def _assert_close(loss, grad, ref_loss, ref_grad, dtype) -> None:
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    else:
        scale = float(ref_grad.abs().max())
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * scale)


CASES = [  # (method, kind): auto for every method, then every explicit kind where it is defined
    ("sample", "auto"), ("hybrid", "auto"), ("topk", "auto"), ("full", "auto"),
    ("topk", "sparse"), ("topk", "topk_renorm"), ("topk", "reverse"), ("hybrid", "ghost"),
    ("sample", "topk_renorm"), ("sample", "reverse"), ("hybrid", "reverse"),
]
RESOLVED = {"sample": "sparse", "hybrid": "sparse", "topk": "ghost", "full": "sparse"}


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("method", "kind"), CASES)
def test_kd_loss_matches_dense_reference(method: str, kind: str, alpha: float, dtype: torch.dtype, device: str) -> None:
    batch = _batch(method)
    z = _logits(dtype)
    ref_kind = RESOLVED[method] if kind == "auto" else kind
    on = _on(batch, device)
    loss, grad = _value_and_grad(lambda x: kd_loss(x, on, alpha=alpha, kind=kind), z.detach().to(device))
    assert loss.device.type == grad.device.type == device
    ref_loss, ref_grad = _value_and_grad(lambda x: _ref_kd_loss(x, batch, ref_kind, alpha), z.detach().double())
    _assert_close(loss.cpu(), grad.cpu(), ref_loss, ref_grad, dtype)
    assert grad.dtype == dtype
    module_loss = KDLoss(alpha=alpha, kind=kind)(z.detach().to(device), on)
    torch.testing.assert_close(module_loss, loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sparse", "topk_renorm", "reverse", "ghost"])
def test_functional_losses_with_token_mask_and_temperature(kind: str) -> None:
    batch = _batch("hybrid", seed=4)
    z = _logits(seed=5)
    tau = 1.7
    token_mask = batch["attention_mask"].bool() & (torch.arange(T) % 3 != 0)
    args = (batch["target_ids"], batch["target_probs"], batch["target_mask"])
    if kind == "ghost":
        k = batch["target_head_size"]
        fn = lambda x: ghost_kd_loss(x, *(a[..., :k] for a in args), batch["target_tail_mass"],  # noqa: E731
                                     token_mask=token_mask, temperature=tau)
    else:
        fn = lambda x: sparse_kd_loss(x, *args, token_mask=token_mask, temperature=tau,  # noqa: E731
                                      normalize=kind == "topk_renorm", reverse=kind == "reverse")

    def ref(x: torch.Tensor) -> torch.Tensor:
        per = _ref_kd_tokens(x, batch, kind, tau)
        return torch.where(token_mask, per, 0.0).sum() / token_mask.sum()

    loss, grad = _value_and_grad(fn, z)
    ref_loss, ref_grad = _value_and_grad(ref, z.detach().double())
    _assert_close(loss, grad, ref_loss, ref_grad, torch.float32)
    assert (grad[~token_mask] == 0).all()


def test_sparse_gradient_is_p_sum_t_minus_t() -> None:
    batch = _batch("topk", seed=2)  # Σt̂ = 1 − tail < 1, so the p·Σt̂ factor matters
    z = _logits(seed=3)
    token_mask = batch["labels"] != IGNORE
    _, grad = _value_and_grad(lambda x: sparse_kd_loss(
        x, batch["target_ids"], batch["target_probs"], batch["target_mask"], token_mask=token_mask), z)
    t, _ = _dense(batch)
    p = torch.softmax(z.detach().double(), -1)
    expected = (p * t.sum(-1, keepdim=True) - t) / token_mask.sum()
    expected = torch.where(token_mask[..., None], expected, 0.0)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["sparse", "topk_renorm", "reverse", "ghost"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_masked_batch_gives_zero_loss_and_grad(kind: str, dtype: torch.dtype) -> None:
    batch = _batch("hybrid")
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    z = _logits(dtype)
    for alpha in (0.0, 0.5, 1.0):
        loss, grad = _value_and_grad(lambda x: kd_loss(x, batch, alpha=alpha, kind=kind), z)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert (grad == 0).all()
    no_tokens = torch.zeros(B, T, dtype=torch.bool)
    loss, grad = _value_and_grad(lambda x: sparse_kd_loss(
        x, batch["target_ids"], batch["target_probs"], batch["target_mask"], token_mask=no_tokens,
        reverse=kind == "reverse"), z)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_ghost_is_finite_when_student_puts_all_mass_on_head() -> None:
    batch = _batch("topk")
    z = torch.full((B, T, V), -80.0)
    z.scatter_(2, batch["target_ids"], 20.0)  # Σ_K p rounds to 1 in fp32
    loss, grad = _value_and_grad(lambda x: kd_loss(x, batch, alpha=1.0, kind="ghost"), z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and loss.item() > 1.0


def test_invalid_arguments_raise() -> None:
    batch = _batch("sample")
    z = _logits()
    with pytest.raises(ConfigError, match="ghost"):
        kd_loss(z, batch, kind="ghost")
    with pytest.raises(ConfigError, match="kind"):
        kd_loss(z, batch, kind="nope")
    with pytest.raises(ConfigError, match="alpha"):
        kd_loss(z, batch, alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        KDLoss(temperature=0.0)


# ---------------------------------------------------------------- chunked
@pytest.mark.parametrize(("method", "kind", "alpha", "tau"), [
    ("sample", "auto", 0.5, 1.0), ("topk", "auto", 1.0, 1.0), ("hybrid", "reverse", 0.5, 1.3),
    ("topk", "topk_renorm", 0.0, 1.0), ("hybrid", "ghost", 0.7, 2.0),
])
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_matches_plain(method: str, kind: str, alpha: float, tau: float, device: str) -> None:
    batch = _on(_batch(method), device)
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(B, T, 16, generator=gen).to(device).requires_grad_(True)
    weight = (0.3 * torch.randn(V, 16, generator=gen)).to(device).requires_grad_(True)
    plain = kd_loss(hidden @ weight.T, batch, alpha=alpha, kind=kind, temperature=tau)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_kd_loss(hidden, weight, batch, alpha=alpha, kind=kind, chunk_size=10, temperature=tau)
    g_chunked = torch.autograd.grad(2.0 * chunked, (hidden, weight))  # scaled upstream gradient
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for gc, gp in zip(g_chunked, g_plain):
        torch.testing.assert_close(gc, 2.0 * gp, rtol=1e-5, atol=1e-6)
    module = ChunkedKDLoss(alpha=alpha, kind=kind, chunk_size=64, temperature=tau)
    torch.testing.assert_close(module(hidden, weight, batch), plain, rtol=1e-5, atol=1e-6)


def test_chunked_bf16_matches_plain() -> None:
    batch = _batch("sample")
    gen = torch.Generator().manual_seed(10)
    hidden = torch.randn(B, T, 16, generator=gen).bfloat16().requires_grad_(True)
    weight = (0.3 * torch.randn(V, 16, generator=gen)).bfloat16().requires_grad_(True)
    plain = kd_loss(hidden @ weight.T, batch)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_kd_loss(hidden, weight, batch, chunk_size=13)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for gc, gp in zip(g_chunked, g_plain):
        assert gc.dtype == torch.bfloat16
        torch.testing.assert_close(gc.float(), gp.float(), rtol=2e-2, atol=2e-2 * float(gp.abs().max()))


# ---------------------------------------------------------------- Monte Carlo: RS-KD is unbiased, top-k is not
R, N_DRAWS = 4000, 50


def _mc_gradients(targets, z: torch.Tensor) -> torch.Tensor:
    """Per-draw gradient rows ``[n, V]``: each of the n positions holds one independent draw."""
    n = targets.num_positions
    items = [{"seq_id": 0, "input_ids": torch.zeros(n, dtype=torch.int64),
              "labels": torch.zeros(n, dtype=torch.int64), "targets": targets}]
    batch = collate(items)
    zz = z.expand(1, n, V).clone().requires_grad_(True)
    loss = kd_loss(zz, batch, alpha=1.0, kind="sparse" if batch["target_method"] != "topk" else "topk_renorm")
    (g,) = torch.autograd.grad(loss, zz)
    return g[0].double() * n  # undo the mean over n tokens


@pytest.mark.parametrize("builder", ["sample", "sample_tau", "hybrid"])
def test_rskd_gradient_is_unbiased_and_topk_renorm_is_not(builder: str) -> None:
    gen = torch.Generator().manual_seed(123)
    t = torch.softmax(2.0 * torch.randn(V, generator=gen, dtype=torch.float64), -1)
    z = torch.randn(V, generator=gen)
    p = torch.softmax(z.double(), -1)
    full_grad = p - t  # gradient of KL(t ‖ p) wrt z
    tr = t.float().expand(R, V).contiguous()
    if builder == "sample":
        targets = build_sample(tr, N_DRAWS, gen)
        var = t * (1 - t) / N_DRAWS
    elif builder == "sample_tau":  # proposal q ∝ t^(1/1.3), importance weights t/q
        targets = build_sample(tr, N_DRAWS, gen, temperature=1.3)
        q = t ** (1 / 1.3) / (t ** (1 / 1.3)).sum()
        var = t * t * (1 - q) / (N_DRAWS * q)
    else:  # hybrid: exact top-5 head, 50 draws from the renormalised tail
        targets = build_hybrid(tr, 5, N_DRAWS, gen)
        head = torch.zeros(V, dtype=torch.bool)
        head[targets.head_ids[0].long()] = True
        m = t[~head].sum()
        var = torch.where(head, 0.0, m * t * (1 - t / m) / N_DRAWS)
    # gradient of one draw is p·Σt̂ − t̂; its variance per coordinate ≈ Var(t̂_i) (+ p_i² Var(Σt̂))
    grads = _mc_gradients(targets, z)
    bound = 5 * torch.sqrt(torch.maximum(var, grads.var(0)) / R) + 1e-6
    err = (grads.mean(0) - full_grad).abs()
    assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.2f}"

    topk_grad = _mc_gradients(build_topk(t.float()[None], 5), z)[0]
    bias = (topk_grad - full_grad).abs()
    assert float(bias.max()) > 10 * float(bound.max()), (float(bias.max()), float(bound.max()))
    assert math.isfinite(float(bias.sum()))
