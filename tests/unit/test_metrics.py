"""Metric helpers against obviously-correct references (plain loops, autograd, dense formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.errors import TargetsError
from logitcache.testing.targets import build_hybrid, build_sample, build_topk
from logitcache.train.losses import ghost_kd_loss
from logitcache.train.metrics import (calibration_bins, dense_estimate, expected_calibration_error,
                                ghost_effective_target, gradient_angle, kl_per_position, norm_ratio)


def _ece_loop(conf: list[float], correct: list[bool], bins: int) -> float:
    """Textbook ECE: bin b holds b/B <= c < (b+1)/B (the last bin also c == 1)."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_matches_loop(bins: int) -> None:
    gen = torch.Generator().manual_seed(bins)
    conf = torch.rand(997, generator=gen, dtype=torch.float64)
    conf[:3] = torch.tensor([0.0, 1.0, 0.5])
    correct = torch.rand(997, generator=gen, dtype=torch.float64) < conf
    expected = _ece_loop(conf.tolist(), correct.tolist(), bins)
    assert expected > 0
    assert expected_calibration_error(conf, correct, bins) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_ece_of_perfect_and_worst_predictors() -> None:
    conf = torch.full((8,), 0.75)
    assert expected_calibration_error(conf, torch.tensor([True] * 6 + [False] * 2)) == pytest.approx(0.0)
    assert expected_calibration_error(torch.ones(5), torch.zeros(5, dtype=torch.bool)) == pytest.approx(1.0)
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0.0


def test_calibration_bins_counts_and_empty_bins() -> None:
    table = calibration_bins(torch.tensor([0.05, 0.06, 0.95, 1.0]), torch.tensor([True, False, True, True]), 10)
    assert table["count"].tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table["accuracy"][0] == pytest.approx(0.5) and table["confidence"][9] == pytest.approx(0.975)
    assert math.isnan(float(table["accuracy"][1]))


def test_ece_rejects_bad_input() -> None:
    with pytest.raises(TargetsError, match="equal length"):
        expected_calibration_error(torch.rand(3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TargetsError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.tensor([1.5]), torch.ones(1, dtype=torch.bool))


def test_gradient_angle_and_norm_ratio() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert gradient_angle(a, b) == pytest.approx(45.0)
    assert gradient_angle([a, -b], [a, -b]) == pytest.approx(0.0, abs=1e-6)
    assert gradient_angle(a, -a) == pytest.approx(180.0)
    assert norm_ratio([2 * a, 2 * b], [a, b]) == pytest.approx(2.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
    assert gradient_angle(x, y) == pytest.approx(math.degrees(math.acos(cos)), abs=1e-4)
    with pytest.raises(TargetsError, match="zero"):
        gradient_angle(torch.zeros(2), a)


def _teacher(t: int = 5, v: int = 23, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(t, v, generator=gen, dtype=torch.float64), -1)


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_dense_estimate_matches_loop(method: str) -> None:
    t = _teacher()
    gen = torch.Generator().manual_seed(1)
    targets = {"topk": lambda: build_topk(t, 4), "sample": lambda: build_sample(t, 20, gen=gen),
               "hybrid": lambda: build_hybrid(t, 3, 20, gen=gen)}[method]()
    dense = dense_estimate(targets, t.shape[1])
    offsets, ids, probs = targets.estimate()
    for row in range(t.shape[0]):
        expected = torch.zeros(t.shape[1], dtype=torch.float64)
        for j in range(int(offsets[row]), int(offsets[row + 1])):
            expected[int(ids[j])] += float(probs[j])
        torch.testing.assert_close(dense[row], expected)


def test_ghost_effective_target_gives_the_ghost_gradient() -> None:
    t = _teacher(t=6, v=31, seed=2)
    targets = build_topk(t, 5)
    z = torch.randn(1, 6, 31, generator=torch.Generator().manual_seed(3), dtype=torch.float32, requires_grad=True)
    ids = targets.head_ids.long()[None]
    loss = ghost_kd_loss(z, ids, targets.head_logprobs.exp()[None], torch.ones_like(ids, dtype=torch.bool),
                         targets.tail_mass[None])
    (grad,) = torch.autograd.grad(loss, z)
    p = torch.softmax(z.detach()[0].double(), -1)
    y = ghost_effective_target(targets, p)
    torch.testing.assert_close(y.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad[0].double() * 6, p - y, atol=2e-6, rtol=1e-4)


def test_kl_per_position_matches_definition() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 2, 7, generator=gen), torch.randn(3, 2, 7, generator=gen)
    ta, tb = torch.softmax(a, -1).reshape(-1, 7), torch.softmax(b, -1).reshape(-1, 7)
    expected = (ta * (ta.log() - tb.log())).sum(-1)
    torch.testing.assert_close(kl_per_position(a, b), expected, atol=1e-6, rtol=1e-5)
    assert float(kl_per_position(a, a).abs().max()) < 1e-6
