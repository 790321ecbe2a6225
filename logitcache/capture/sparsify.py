"""Sparsifiers: turn teacher logits ``[T, V]`` into :class:`~logitcache.targets.SparseTargets`.

Pure torch functions, CPU friendly, deterministic, and *row local*: every output row depends only
on the same row of ``logits`` (and of ``uniforms``), so calling on rows ``[a:b]`` gives exactly
(bit for bit) rows ``[a:b]`` of the whole call. The capture loop relies on this to chunk positions.

Speed design (2-core CPU, V≈49k): the expensive part is one ``exp`` over every logit. It is done
in small row chunks (:data:`ROW_CHUNK` rows, a few MiB, so it stays in cache) into a reused fp32
buffer; per chunk the buffer is reduced to per-block sums (:data:`BLOCK` ids per block, accumulated
in float64). Those block sums give the log-normaliser, the exact tail mass and the coarse level of a
two-level inverse CDF for sampling, all from the same single ``exp`` pass. Top-k uses a block-max
prefilter: the top-k ids lie in the k blocks with the largest maxima, so ``torch.topk`` runs over
``k·BLOCK`` candidates instead of ``V``.

Sampling precision: a draw picks a block with probability ``B_b / S`` (``B_b`` the float64 sum of
the block's fp32 ``exp`` values, ``S = Σ B_b``, cumulated in float64), then an id inside the block with
probability ``e_j / Σ_block e`` (float64 cumsum of 64 fp32 values, searched by the *relative*
position inside the block, so block and in-block sums never disagree). The drawn distribution is
therefore the exact normalisation of the fp32 values ``e_i = exp(fp32(x_i − max)/τ)``: each id's
probability is off by a relative ~1e-7 (fp32 subtraction and ``exp`` rounding), i.e. well under 1e-6
absolute; there is no fp32 cumsum absorption bias. Ids with ``e_i = 0`` (logit −inf, or an
underflow below ~1e-38 of the maximum) are never drawn.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .budget import DrawnChunk, draw_uniforms, run_lengths, sequence_seed
from .config import SparsifyConfig
from ..choices import METHODS
from ..errors import ConfigError, TargetsError
from ..targets import SparseTargets

ROW_CHUNK = 16
"""Rows processed together in the ``exp`` pass (16 × 49152 fp32 = 3 MiB buffer)."""
BLOCK = 64
"""Ids per block of the two-level CDF and of the top-k prefilter."""


class _Pass(NamedTuple):
    """What :func:`_exp_pass` returns (float64 sums per row; ``None`` where not asked for)."""

    totals: torch.Tensor  # Σ e
    p_totals: torch.Tensor | None  # Σ exp(x − max) at τ = 1 (importance weights)
    draws: torch.Tensor | None  # int64[T, N] drawn ids
    squares: torch.Tensor | None  # Σ e² (the variance an adaptive budget allocates by)


# ----------------------------------------------------------------------------- validation


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TargetsError(f"logits must be a torch.Tensor; found {type(logits).__name__}")
    if logits.dim() != 2:
        raise TargetsError(f"logits must be 2-D [positions, vocab]; found shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TargetsError(f"logits must be a floating dtype; found {logits.dtype}")
    if logits.shape[1] < 1:
        raise TargetsError(f"logits need a vocabulary of at least 1; found shape {list(logits.shape)}")


def _check_row_max(row_max: torch.Tensor, offset: int = 0) -> None:
    """Raise on rows whose maximum is NaN (any NaN propagates), +inf, or −inf (all −inf)."""
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        value = float(row_max[row])
        what = "a NaN" if value != value else ("+inf" if value > 0 else "only -inf")
        raise TargetsError(f"logits row {row + offset} contains {what}; expected finite logits "
                           f"with at least one finite value per row")


def _check_uniforms(uniforms: torch.Tensor | None, t: int, n: int, device: torch.device) -> torch.Tensor:
    """The uniforms as float64 on the logits' ``device`` (they are drawn on the CPU, see draw_uniforms)."""
    if uniforms is None:
        raise TargetsError(f"sampling needs uniforms float64[{t}, {n}]; found None (use draw_uniforms)")
    if not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != (t, n):
        shape = list(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
        raise TargetsError(f"uniforms must have shape [positions, samples] = [{t}, {n}]; found {shape}")
    if not uniforms.is_floating_point():
        raise TargetsError(f"uniforms must be float64; found {uniforms.dtype}")
    u = uniforms.to(device=device, dtype=torch.float64)
    if u.numel() and not bool(((u >= 0) & (u < 1)).all()):
        raise TargetsError("uniforms must lie in [0, 1); found values outside (or NaN)")
    return u


# ----------------------------------------------------------------------------- building blocks


def _block_max(x: torch.Tensor) -> torch.Tensor:
    """``[T, ceil(V / BLOCK)]`` maximum of each block of ids (NaN propagates)."""
    t, v = x.shape
    full = v // BLOCK
    parts = [x[:, : full * BLOCK].reshape(t, full, BLOCK).amax(-1)] if full else []
    if v % BLOCK:
        parts.append(x[:, full * BLOCK :].amax(-1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _topk_by_id(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``y [T, n]`` in the order (value descending, index ascending).

    ``torch.topk`` is exact in the *values* it returns but chooses freely among equal values, and
    that choice differs between devices, versions and input shapes. Its set is kept where it is the
    only possible one (no entry outside equals the k-th value); in rows where equal values cross the
    boundary, every entry above the k-th value is kept plus the lowest-index entries equal to it until
    ``k`` are kept. A stable sort then orders them. So the chosen set and its order are a function of
    the values alone, on every device.
    """
    top = torch.topk(y, k, dim=1)
    if bool(torch.isnan(top.values[:, 0]).any()):  # topk ranks NaN first; the caller refuses the row by number
        return top.values, top.indices
    idx = top.indices
    threshold = top.values[:, -1:]
    crossing = (y >= threshold).sum(1) > k
    if bool(crossing.any()):
        rows = crossing.nonzero()[:, 0]
        sub, sub_threshold = y[rows], threshold[rows]
        above, tied = sub > sub_threshold, sub == sub_threshold
        room = k - above.sum(1, keepdim=True)
        keep = above | (tied & (torch.cumsum(tied, 1) <= room))
        idx = idx.clone()
        idx[rows] = keep.nonzero()[:, 1].reshape(rows.numel(), k)  # row-major: ascending index per row
    idx = torch.sort(idx, dim=1).values
    vals = torch.gather(y, 1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def _head(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row: ``(values float32[T, k], ids int64[T, k])``, by descending value and,
    among equal values, ascending id (:func:`_topk_by_id`): canonical at exact ties.

    The top-k ids lie in the k blocks with the largest block maxima, so when ``k·BLOCK`` is small
    against ``V`` the selection runs on those ``k·BLOCK`` candidates only. The blocks are chosen by
    the same (value, index) rule and laid out in ascending id order, which keeps the result exact at
    ties too: a tied id left outside is in a block whose index exceeds every chosen tied block's, and
    at least as many tied ids as the head has room for lie in the chosen ones. Rows whose k-th value
    is −inf (fewer than k finite logits) are redone over the whole row so padding is never chosen.
    """
    t, v = x.shape
    if t == 0 or 4 * k * BLOCK > v:
        vals, ids = _topk_by_id(x, k)
        return vals.float(), ids
    top_blocks = torch.sort(_topk_by_id(_block_max(x), k)[1], dim=1).values  # [T, k], ascending
    cand_ids = (top_blocks[:, :, None] * BLOCK + torch.arange(BLOCK, device=x.device)).reshape(t, -1)
    if v % BLOCK == 0:  # copy whole blocks (much faster than an element gather)
        cand = x.reshape(t, v // BLOCK, BLOCK)[torch.arange(t, device=x.device)[:, None], top_blocks].reshape(t, -1)
    else:
        outside = cand_ids >= v
        cand = torch.gather(x, 1, cand_ids.clamp(max=v - 1)).masked_fill_(outside, float("-inf"))
    vals, pos = _topk_by_id(cand, k)
    ids = torch.gather(cand_ids, 1, pos)
    redo = vals[:, -1] == float("-inf")
    if bool(redo.any()):
        rv, ri = _topk_by_id(x[redo], k)
        vals[redo], ids[redo] = rv, ri
    return vals.float(), ids


def _exp_pass(
    x: torch.Tensor,
    row_max: torch.Tensor,
    inv_tau: float = 1.0,
    head_ids: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    with_p_total: bool = False,
    adaptive: bool = False,
) -> _Pass:
    """One cache-blocked ``exp`` pass over ``x`` (``[T, V]``, any float dtype).

    Per row computes ``e = exp(fp32(x − row_max) · inv_tau)`` with the ``head_ids`` (int64[T, k])
    zeroed, and returns ``totals`` float64[T] = Σ e and what is asked for (:class:`_Pass`).
    ``p_totals`` is ``Σ exp(x − row_max)`` (τ = 1), requested for importance weights. ``draws`` are
    ``N`` inverse-CDF draws per row from ``e / Σ e`` using ``uniforms`` (float64[T, N]), ascending; with
    ``adaptive`` in the order of the uniforms instead (a prefix is a sample), and ``squares`` = Σ e².
    """
    t, v = x.shape
    nb = -(-v // BLOCK)
    dev = x.device
    # CPU: row chunks that fit the cache; CUDA: one launch per op over all rows (rows are independent)
    rows = max(t, 1) if dev.type == "cuda" else ROW_CHUNK
    buf = torch.zeros(min(rows, t), nb * BLOCK, device=dev)  # padding columns stay 0
    totals = torch.empty(t, dtype=torch.float64, device=dev)
    p_totals = torch.empty(t, dtype=torch.float64, device=dev) if with_p_total else None
    draws = None if uniforms is None else torch.empty(uniforms.shape, dtype=torch.int64, device=dev)
    squares = torch.empty(t, dtype=torch.float64, device=dev) if adaptive else None
    for a in range(0, t, rows):
        b = min(a + rows, t)
        e = buf[: b - a]
        ev = e[:, :v]
        torch.sub(x[a:b], row_max[a:b, None], out=ev)
        if p_totals is not None:
            p_totals[a:b] = torch.exp(ev).view(b - a, -1).sum(1).double()
        if inv_tau != 1.0:
            ev.mul_(inv_tau)
        ev.exp_()
        if head_ids is not None:
            ev.scatter_(1, head_ids[a:b], 0.0)
        sums = e.view(b - a, nb, BLOCK).sum(-1).double()
        totals[a:b] = sums.sum(1)
        if squares is not None:
            squares[a:b] = (e * e).view(b - a, nb, BLOCK).sum(-1).double().sum(1)
        if draws is not None:
            draws[a:b] = _draw(e.view(b - a, nb, BLOCK), sums, uniforms[a:b], adaptive)
    return _Pass(totals, p_totals, draws, squares)


def _draw(eb: torch.Tensor, sums: torch.Tensor, u: torch.Tensor, in_uniform_order: bool = False) -> torch.Tensor:
    """Two-level inverse CDF: ``int64[r, N]`` ids, ascending per row (or, ``in_uniform_order``, entry ``j`` the
    id uniform ``u[:, j]`` draws).

    ``eb`` float32[r, nb, BLOCK] unnormalised weights, ``sums`` float64[r, nb] their block sums,
    ``u`` float64[r, N]. Level 1 picks block ``b`` from the float64 cumsum of ``sums``; level 2
    picks inside the block by the *relative* position ``(target − C_{b−1}) / B_b`` against a float64
    cumsum of the 64 values, so the two levels cannot disagree. Searches use ``right=True`` (an id
    with zero weight never owns an interval) and are clamped to the last id with positive weight.
    Rows with zero total return meaningless ids (callers drop them).
    """
    r = eb.shape[0]
    cdf = torch.cumsum(sums, 1)
    total = cdf[:, -1:].contiguous()
    ordered = torch.sort(u, 1)
    target = ordered.values * total
    last = torch.searchsorted(cdf, total, right=False)
    blk = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
    prev = torch.gather(torch.nn.functional.pad(cdf, (1, 0)), 1, blk)
    frac = ((target - prev) / torch.gather(sums, 1, blk)).clamp_(0.0, 1.0)
    inner = eb[torch.arange(r, device=eb.device)[:, None], blk].to(torch.float64).cumsum(-1)  # [r, N, BLOCK]
    inner_total = inner[:, :, -1:]
    j = torch.searchsorted(inner, frac[:, :, None] * inner_total, right=True)
    j_last = torch.searchsorted(inner, inner_total.contiguous(), right=False)
    j = torch.minimum(j, j_last).squeeze(-1)
    ids = blk * BLOCK + j
    return torch.empty_like(ids).scatter_(1, ordered.indices, ids) if in_uniform_order else ids


def _lse_parts(vals: torch.Tensor, tail_totals: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From head values float32[T, k] (descending, so ``vals[:, 0]`` is the row max) and the tail
    sums float64[T] of ``exp(x − max)``: ``(head_logprobs float32[T, k], tail_mass float32[T], all_totals
    float64[T])``. Both sums are of positive terms, so the tail mass is exact to relative ~1e-7, however small."""
    d = vals.double() - vals[:, :1].double()
    head_totals = torch.exp(d).sum(1)
    all_totals = head_totals + tail_totals
    logprobs = (d - torch.log(all_totals)[:, None]).float()
    return logprobs, (tail_totals / all_totals).float(), all_totals


def _check_k(k: int, name: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"{name} must be an integer >= 1; found {k!r}")


# ----------------------------------------------------------------------------- public API


def topk(logits: torch.Tensor, k: int) -> SparseTargets:
    """Exact top-k head: ``head_ids`` int32[T, k'] by descending probability (``k' = min(k, V)``),
    ``head_logprobs`` float32[T, k'] (log-softmax), ``tail_mass`` float32[T] = mass outside the head."""
    _check_logits(logits)
    _check_k(k)
    kk = min(k, logits.shape[1])
    vals, ids = _head(logits, kk)
    _check_row_max(vals[:, 0])
    if kk == logits.shape[1]:
        tail = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    else:
        tail = _exp_pass(logits, vals[:, 0], head_ids=ids).totals
    logprobs, tail_mass, _ = _lse_parts(vals, tail)
    return SparseTargets("topk", head_ids=ids.to(torch.int32), head_logprobs=logprobs, tail_mass=tail_mass)


def full(logits: torch.Tensor) -> SparseTargets:
    """All ``V`` ids by descending probability with fp32 log-probabilities; ``tail_mass`` 0."""
    _check_logits(logits)
    vals, ids = torch.sort(logits, dim=1, descending=True, stable=True)
    row_max = vals[:, 0].float()
    _check_row_max(row_max)
    totals = _exp_pass(logits, row_max).totals
    lse = (row_max.double() + torch.log(totals)).float()
    logprobs = vals.float() - lse[:, None]
    tail = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return SparseTargets("full", head_ids=ids.to(torch.int32), head_logprobs=logprobs, tail_mass=tail)


def sample(logits: torch.Tensor, num_samples: int, temperature: float, uniforms: torch.Tensor,
           adaptive: bool = False) -> SparseTargets | DrawnChunk:
    """RS-KD: ``N`` draws with replacement from ``q ∝ p^(1/τ)`` by inverse CDF on ``uniforms``.

    Returns per position the distinct drawn ids ascending (``sample_ids`` int32[P]), their
    ``sample_counts`` int32[P] (summing to N), ``sample_lengths`` int32[T], and for ``τ ≠ 1``
    ``sample_weights`` float32[P] = ``p_i / q_i`` (computed in float64 from the logits). With ``adaptive``
    (τ = 1 only; ``N`` = the cap) the draws of every uniform and each row's variance ``1 − Σ p²`` instead, as a
    :class:`~logitcache.capture.budget.DrawnChunk` that :func:`~logitcache.capture.budget.sequence_targets` ends.
    """
    _check_logits(logits)
    _check_k(num_samples, "num_samples")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0; found {temperature!r}")
    if adaptive and temperature != 1.0:
        raise ConfigError(f"an adaptive sample budget samples at temperature 1; found temperature={temperature}")
    u = _check_uniforms(uniforms, logits.shape[0], num_samples, logits.device)
    row_max = logits.amax(1).float()
    _check_row_max(row_max)
    inv_tau = 1.0 / float(temperature)
    res = _exp_pass(logits, row_max, inv_tau, None, u, with_p_total=inv_tau != 1.0, adaptive=adaptive)
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if adaptive:
        return DrawnChunk("sample", res.draws, 1.0 - res.squares / res.totals**2, valid)
    lengths, ids, counts, rows = run_lengths(res.draws, torch.full_like(row_max, num_samples, dtype=torch.int64))
    weights = None
    if res.p_totals is not None:
        d = logits[rows, ids].double() - row_max[rows].double()
        log_w = d - torch.log(res.p_totals[rows]) - d * inv_tau + torch.log(res.totals[rows])
        weights = torch.exp(log_w).float()
    return SparseTargets(
        "sample", sample_lengths=lengths, sample_ids=ids.to(torch.int32), sample_counts=counts,
        sample_weights=weights, num_samples=num_samples,
    )


def hybrid(logits: torch.Tensor, k: int, num_samples: int, uniforms: torch.Tensor,
           adaptive: bool = False) -> SparseTargets | DrawnChunk:
    """Exact top-k head (as :func:`topk`) plus ``N`` draws from the renormalised tail.

    The tail part lists distinct tail ids ascending with counts; the estimate of a tail id is
    ``tail_mass · count / N``. Positions with no tail (``k >= V`` or zero tail mass) get no draws
    (length 0). With ``adaptive`` a :class:`~logitcache.capture.budget.DrawnChunk` (as :func:`sample`) whose
    variance is the tail's, ``m² (1 − Σ q²) = (S_tail² − Σ e²) / S²``.
    """
    _check_logits(logits)
    _check_k(k)
    _check_k(num_samples, "num_samples")
    t, v = logits.shape
    u = _check_uniforms(uniforms, t, num_samples, logits.device)
    kk = min(k, v)
    vals, ids = _head(logits, kk)
    _check_row_max(vals[:, 0])
    if kk == v:
        zeros = torch.zeros(t, dtype=torch.float64, device=logits.device)
        res = _Pass(zeros, None, torch.zeros(t, num_samples, dtype=torch.int64, device=logits.device), zeros)
    else:
        res = _exp_pass(logits, vals[:, 0], 1.0, ids, u, adaptive=adaptive)
    logprobs, tail_mass, all_totals = _lse_parts(vals, res.totals)
    head = dict(head_ids=ids.to(torch.int32), head_logprobs=logprobs, tail_mass=tail_mass)
    if adaptive:
        return DrawnChunk("hybrid", res.draws, (res.totals**2 - res.squares) / all_totals**2, res.totals > 0, **head)
    full_rows = torch.where(res.totals > 0, num_samples, 0)
    lengths, s_ids, counts, _ = run_lengths(res.draws, full_rows)
    return SparseTargets("hybrid", **head, sample_lengths=lengths, sample_ids=s_ids.to(torch.int32),
                         sample_counts=counts, num_samples=num_samples)


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``float32[T]`` the exact log-softmax (τ = 1) of each row of ``logits`` at its label ``labels[t]``:
    ``(x_label − max) − log Σ exp(x − max)``, the sum from the same cache-blocked pass as :func:`full`
    (float64 block sums), so it is row local like every sparsifier."""
    _check_logits(logits)
    t, v = logits.shape
    labels = labels.to(device=logits.device, dtype=torch.int64)
    if tuple(labels.shape) != (t,) or (t and not bool(((labels >= 0) & (labels < v)).all())):
        raise TargetsError(f"labels must be int[{t}] ids in [0, {v}); found shape {list(labels.shape)}"
                           + (f", values in [{int(labels.min())}, {int(labels.max())}]" if labels.numel() else ""))
    row_max = logits.amax(1).float()
    _check_row_max(row_max)
    totals = _exp_pass(logits, row_max).totals
    picked = logits.gather(1, labels[:, None])[:, 0].double()
    return (picked - row_max.double() - torch.log(totals)).float()


def sparsify(logits: torch.Tensor, config: SparsifyConfig, uniforms: torch.Tensor | None
             ) -> SparseTargets | DrawnChunk:
    """Dispatch on ``config.method``; ``uniforms`` (float64[T, config.max_samples]) is needed by sample and
    hybrid. An adaptive budget (``config.allocation``) gives a :class:`DrawnChunk`: the capture joins a
    sequence's chunks with :func:`~logitcache.capture.budget.sequence_targets`."""
    adaptive = config.allocation != "fixed"
    if config.method == "topk":
        return topk(logits, config.k)
    if config.method == "sample":
        return sample(logits, config.max_samples, config.temperature, uniforms, adaptive)
    if config.method == "hybrid":
        return hybrid(logits, config.k, config.max_samples, uniforms, adaptive)
    if config.method == "full":
        return full(logits)
    raise ConfigError(f"method must be one of {', '.join(METHODS)}; found {config.method!r}")


__all__ = ["draw_uniforms", "full", "hybrid", "label_logprobs", "sample", "sequence_seed", "sparsify", "topk"]
