"""The ``sample_totals`` row column of an adaptive-budget store (docs/format.md, "Adaptive sample budgets").

A store captured with ``--sample-allocation variance`` gives each position its own number of draws
``N_t`` (1 to :func:`adaptive_cap`, ``Σ_t N_t = N·T`` per row); the row then keeps them, one count-width
value a position (``u1`` while ``N <= 255``, else ``<u2``), right after ``sample_counts``. The label's count
stays implied (``N_t`` minus the other counts). Its encoding is version 5 (``encoding.sample_totals: true``),
so a reader that does not know the column refuses the store instead of reading every count over ``N``.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptShardError, TargetsError
from ..targets import SparseTargets
from .planes import view

TOTALS_COLUMN = "sample_totals"
ADAPTIVE_CAP_FACTOR = 4


def count_dtype(num_samples: int) -> str:
    """Stored ``count - 1``, per-position lengths and totals are at most the cap: one byte while ``N <= 255``."""
    return "u1" if num_samples <= 255 else "<u2"


def adaptive_cap(num_samples: int) -> int:
    """The most draws one position of an adaptive budget of mean ``N`` gets: ``4·N``, within what the count
    columns' byte width holds (255 while ``N <= 255``, so an adaptive store's columns keep a fixed store's dtype)."""
    return min(ADAPTIVE_CAP_FACTOR * num_samples, 255 if num_samples <= 255 else 65535)


def totals_problem(totals: np.ndarray, num_samples: int, num_positions: int) -> str | None:
    """What is wrong with per-position draws ``totals`` of an adaptive budget of mean ``N``, or None."""
    cap = adaptive_cap(num_samples)
    if totals.shape != (num_positions,):
        return f"has {totals.size} values for {num_positions} positions; expected one per position"
    outside = np.flatnonzero((totals < 1) | (totals > cap))
    if outside.size:
        return (f"at position {int(outside[0])} is {int(totals[outside[0]])}; expected 1 to {cap} "
                f"({ADAPTIVE_CAP_FACTOR}·N within the count width, N = {num_samples})")
    if int(totals.sum()) != num_samples * num_positions:
        return (f"sum to {int(totals.sum())} over {num_positions} positions; expected N·T = {num_samples} × "
                f"{num_positions} = {num_samples * num_positions}")
    return None


def checked_totals(kept: bool, t: SparseTargets) -> np.ndarray | int:
    """Each position's draws: ``t.sample_totals`` (int64[T], checked as an adaptive budget) in a store that keeps
    them (``kept``), else ``N``; TargetsError when the targets and the store disagree."""
    if kept != (t.sample_totals is not None):
        raise TargetsError("the store keeps per-position draw counts (an adaptive sample budget) but the targets "
                           "carry no sample_totals" if kept else "the targets carry sample_totals (an adaptive "
                           "sample budget) but the store's encoding has no sample_totals column; write them to a "
                           "store captured with --sample-allocation variance")
    if t.sample_totals is None:
        return t.num_samples
    totals = t.sample_totals.numpy().astype(np.int64)
    problem = totals_problem(totals, t.num_samples, t.num_positions)
    if problem:
        raise TargetsError(f"sample_totals {problem}")
    return totals


def decoded_totals(columns: dict[str, np.ndarray], num_samples: int, num_positions: int) -> np.ndarray | int:
    """A row's per-position draws (its ``sample_totals`` column, checked), or ``N`` for a fixed-budget row."""
    if TOTALS_COLUMN not in columns:
        return num_samples
    totals = view(columns[TOTALS_COLUMN], count_dtype(num_samples), num_positions).astype(np.int64)
    problem = totals_problem(totals, num_samples, num_positions)
    if problem:
        raise CorruptShardError(f"column {TOTALS_COLUMN} {problem}")
    return totals


def misplaced_sums(counts: np.ndarray, lengths: np.ndarray, totals: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, wrong)``: each position's counts (grouped by position, ``lengths`` per position) summed, and the
    sampled positions whose sum is not their draws ``totals`` (an array, or one ``N`` for all)."""
    sums = np.bincount(np.repeat(np.arange(lengths.size), lengths), weights=counts, minlength=lengths.size)
    return sums, np.flatnonzero((lengths > 0) & (sums != totals))


def check_decoded_sums(counts: np.ndarray, lengths: np.ndarray, totals: np.ndarray) -> None:
    """Each sampled position's decoded counts (grouped by position) sum to its own draws."""
    sums, wrong = misplaced_sums(counts, lengths, totals)
    if wrong.size:
        bad = int(wrong[0])
        raise CorruptShardError(f"position {bad}: sample counts sum to {int(sums[bad])}; its {TOTALS_COLUMN} "
                                f"says {int(totals[bad])}")


def totals_histogram(targets: list[SparseTargets]) -> tuple[int, ...] | None:
    """``h[i]`` = positions of ``targets`` given ``i + 1`` draws (up to the largest), what a unit record keeps
    for ``inspect``; None when the targets have fixed budgets."""
    if not targets or targets[0].sample_totals is None:
        return None
    counts = np.bincount(np.concatenate([t.sample_totals.numpy() for t in targets]).astype(np.int64))
    return tuple(int(c) for c in counts[1:])


def histogram_summary(histograms: list[tuple[int, ...]]) -> dict[str, float | int]:
    """``min``, ``mean``, ``max`` and the 10/50/90% quantiles of the draws per position the ``histograms`` count."""
    size = max(len(h) for h in histograms)
    total = np.zeros(size, dtype=np.int64)
    for h in histograms:
        total[:len(h)] += h
    values, positions = np.arange(1, size + 1), int(total.sum())
    cum = np.cumsum(total)
    quantile = {f"p{q}": int(values[np.searchsorted(cum, q / 100 * positions)]) for q in (10, 50, 90)}
    used = values[total > 0]
    return {"min": int(used.min()), "mean": float((values * total).sum() / positions), **quantile,
            "max": int(used.max())}


def draws_summary(records: list) -> dict[str, dict[str, float | int]]:
    """``{"sample_totals": histogram_summary}`` over the unit records (ShardRecord) that carry a histogram (what
    ``inspect`` reports of an adaptive-budget store, from the manifest alone), else ``{}``."""
    histograms = [r.sample_totals for r in records if r.sample_totals is not None]
    return {TOTALS_COLUMN: histogram_summary(histograms)} if histograms else {}
