"""``impl="compiled"`` (torch.compile, logitcache/train/losses_fused.py) vs a float64 dense reference.

The reference below is written from the definitions (dense teacher by scatter, ``log_softmax`` in
float64, autograd for the gradient) and shares no code with the loss. Tolerances: fp32 logits —
loss and gradient within 1e-5; bf16 logits — the loss within 1e-5 of the reference on the same
(upcast) values, the bf16 gradient within rtol 1e-2 and atol 1e-2 · max|grad|. Compile time is kept
small: ``dynamic=True`` makes one compile per dtype and number of temperature groups serve every
shape here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, make_items

from logitcache.errors import ConfigError
from logitcache.train import losses_fused
from logitcache.train.collate import collate
from logitcache.train.losses import KDLoss, kd_loss
from logitcache.train.losses_chunked import ChunkedKDLoss, chunked_kd_loss

B, T, V = 3, 29, 131
LENGTHS = [29, 17, 5]  # padded rows (labels -100) are masked tokens
IGNORE = -100


def _batch(method: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.softmax(2.5 * torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1).float()
    return collate(make_items(teacher, LENGTHS, method, seed=seed, k=4, n=50), ignore_index=IGNORE)


def _logits(dtype: torch.dtype, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(B, T, V, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)


def _on(batch: dict, device: str) -> dict:
    return {k: x.to(device) if isinstance(x, torch.Tensor) else x for k, x in batch.items()}


def _reference(z: torch.Tensor, batch: dict, alpha: float, tau: float, renorm: bool = False) -> torch.Tensor:
    """``(1 − α)·CE + α·Σ_j t̂_j (log t̂_j − log softmax(z/τ)_j)``, mean over labelled tokens (float64)."""
    z = z.double().reshape(-1, V)
    ids, probs = batch["target_ids"].reshape(z.shape[0], -1), batch["target_probs"].reshape(z.shape[0], -1)
    kept = torch.where(batch["target_mask"].reshape(ids.shape), probs.double(), 0.0)
    t = torch.zeros_like(z).scatter_add_(1, ids, kept)
    if renorm:
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-300)
    kd = (torch.special.xlogy(t, t) - t * F.log_softmax(z / tau, -1)).sum(-1)
    labels = batch["labels"].reshape(-1)
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="none")
    keep = labels != IGNORE
    return torch.where(keep, (1 - alpha) * ce + alpha * kd, 0.0).sum() / keep.sum().clamp_min(1)


def _value_and_grad(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


# every alpha in fp32 and bf16, τ ≠ 1 with KD alone (one temperature group) and mixed with CE (two groups:
# fp32 only, to spare a compile: the bf16 rounding is the one-group code)
CASES = [(a, 1.0, d) for a in (0.0, 0.5, 1.0) for d in (torch.float32, torch.bfloat16)] + [
    (1.0, 0.7, torch.float32), (1.0, 0.7, torch.bfloat16), (0.5, 0.7, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("alpha", "tau", "dtype"), CASES)
@pytest.mark.parametrize("method", ["sample", "hybrid"])
def test_compiled_matches_float64_reference(method: str, alpha: float, tau: float, dtype: torch.dtype,
                                            device: str) -> None:
    batch, z = _on(_batch(method), device), _logits(dtype, device)
    loss, (grad,) = _value_and_grad(
        lambda x: kd_loss(x, batch, alpha=alpha, kind="sparse", temperature=tau, impl="compiled"), z)
    ref, (ref_grad,) = _value_and_grad(lambda x: _reference(x, batch, alpha, tau), z.detach().double().requires_grad_())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    _assert_close(grad, ref_grad, dtype)


def test_topk_renorm_matches_reference() -> None:
    batch, z = _batch("topk"), _logits(torch.float32)
    loss, (grad,) = _value_and_grad(lambda x: kd_loss(x, batch, alpha=0.5, kind="topk_renorm", impl="compiled"), z)
    ref, (ref_grad,) = _value_and_grad(lambda x: _reference(x, batch, 0.5, 1.0, renorm=True),
                                       z.detach().double().requires_grad_())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    _assert_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize(("method", "kind"), [("topk", "ghost"), ("hybrid", "ghost"), ("sample", "reverse")])
def test_other_kinds_equal_the_plain_path(method: str, kind: str) -> None:
    """Only the student side is compiled, so every kind works; the plain path is tested in test_losses.py."""
    batch, z = _batch(method), _logits(torch.float32)
    got = _value_and_grad(lambda x: kd_loss(x, batch, kind=kind, impl="compiled"), z)
    want = _value_and_grad(lambda x: kd_loss(x, batch, kind=kind), z)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_duplicate_ids_and_the_label_among_them() -> None:
    """The gradient at a gathered id sums every entry naming it (a label that is also a target id)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 9, generator=gen, requires_grad=True)
    ids = torch.tensor([[2, 2, 5], [0, 1, 8], [7, 3, 3], [4, 4, 4]])
    labels = torch.tensor([[2], [8], [6], [4]])
    g_kd, g_ce = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    for tau in (1.0, 0.6):
        logp, logp_label = losses_fused.compiled_log_probs(z, ids, labels, tau, True, True)
        (grad,) = torch.autograd.grad((logp * g_kd).sum() + (logp_label * g_ce).sum(), z)
        z64 = z.detach().double().requires_grad_()
        want = ((F.log_softmax(z64 / tau, -1).gather(1, ids) * g_kd).sum()
                + (F.log_softmax(z64, -1).gather(1, labels)[:, 0] * g_ce).sum())
        torch.testing.assert_close(logp.double(), F.log_softmax(z64 / tau, -1).gather(1, ids), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), torch.autograd.grad(want, z64)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_masked_batch_gives_zero_loss_and_grad(dtype: torch.dtype) -> None:
    batch = _batch("hybrid")
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    loss, (grad,) = _value_and_grad(lambda x: kd_loss(x, batch, alpha=0.5, impl="compiled"), _logits(dtype))
    assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_fused_linear_matches_reference_on_the_plain_head(alpha: float) -> None:
    """``chunked_kd_loss(impl="compiled")`` (hidden + head, chunks of 13 rows: a short last one) vs float64."""
    batch, gen, d = _batch("sample"), torch.Generator().manual_seed(5), 24
    h = torch.randn(B, T, d, generator=gen, requires_grad=True)
    w = (torch.randn(V, d, generator=gen) / d**0.5).requires_grad_(True)
    got = _value_and_grad(lambda a, b: chunked_kd_loss(a, b, batch, alpha=alpha, chunk_size=13, impl="compiled"), h, w)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = _value_and_grad(lambda a, b: _reference(a @ b.T, batch, alpha, 1.0), h64, w64)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_the_chunked_module_takes_the_compiled_path_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ChunkedKDLoss(impl="compiled")`` is ``chunked_kd_loss(impl="compiled")``: the same values and gradients, bit
    for bit, through the compiled student side (its calls counted; the plain module makes none)."""
    batch, gen, d = _batch("hybrid"), torch.Generator().manual_seed(6), 24
    h = torch.randn(B, T, d, generator=gen, requires_grad=True)
    w = (torch.randn(V, d, generator=gen) / d**0.5).requires_grad_(True)
    calls, real = [], losses_fused.compiled_log_probs
    monkeypatch.setattr(losses_fused, "compiled_log_probs", lambda *a: calls.append(1) or real(*a))
    module = ChunkedKDLoss(alpha=0.5, chunk_size=13, temperature=0.7, impl="compiled")
    got = _value_and_grad(lambda a, b: module(a, b, batch), h, w)
    chunks = len(calls)
    want = _value_and_grad(lambda a, b: chunked_kd_loss(a, b, batch, alpha=0.5, chunk_size=13, temperature=0.7,
                                                        impl="compiled"), h, w)
    assert chunks == len(calls) - chunks == -(-B * T // 13)  # one call per chunk, each way
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, r) for g, r in zip(got[1], want[1]))
    plain = _value_and_grad(lambda a, b: ChunkedKDLoss(alpha=0.5, chunk_size=13, temperature=0.7)(a, b, batch), h, w)
    assert len(calls) == 2 * chunks  # the plain module never reaches the compiled side
    torch.testing.assert_close(plain[0], want[0], rtol=1e-5, atol=1e-6)
    assert "impl='compiled'" in repr(module)


def test_compile_failure_falls_back_to_the_plain_path_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(losses_fused, "_KERNELS", losses_fused._Kernels(backend=broken_backend))
    monkeypatch.setattr(losses_fused, "_WORKS", {})
    batch, z = _batch("sample"), _logits(torch.float32)
    with pytest.warns(RuntimeWarning, match=r"impl='compiled' is unavailable on cpu: compiling failed .*no C\+\+ "
                                            r"compiler here.*using the plain loss") as caught:
        got = [_value_and_grad(lambda x: kd_loss(x, batch, impl="compiled"), z) for _ in range(2)]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    want = _value_and_grad(lambda x: kd_loss(x, batch), z)
    for g in got:
        assert torch.equal(g[0], want[0]) and torch.equal(g[1][0], want[1][0])


def test_working_compile_warns_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert losses_fused.compile_works(torch.device("cpu"))


def test_unknown_impl_is_refused() -> None:
    batch = _batch("sample")
    with pytest.raises(ConfigError, match="impl must be one of plain, compiled; found 'triton'"):
        kd_loss(_logits(torch.float32), batch, impl="triton")
    with pytest.raises(ConfigError, match="impl must be one of plain, compiled; found 'fast'"):
        KDLoss(impl="fast")
    with pytest.raises(ConfigError, match="impl must be one of plain, compiled; found 'Compiled'"):
        ChunkedKDLoss(impl="Compiled")
