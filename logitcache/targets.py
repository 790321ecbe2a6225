"""SparseTargets: the in-memory contract between sparsifiers, stores and losses.

A sparse summary of the teacher's next-token distribution at ``T`` positions, made of
two optional parts:

* a **head** of exactly ``k`` ids per position with their exact teacher log-probabilities
  (``topk``, the head of ``hybrid``, and ``full`` where ``k == V``), plus the exact
  ``tail_mass`` the head leaves out;
* a ragged **sample** part: per position the distinct ids drawn by ``N`` draws with
  replacement, with their counts (``sample`` = RS-KD, the tail of ``hybrid``), stored as
  flat arrays and per-position lengths, never as Python lists.

Every method yields the same estimate shape through :meth:`SparseTargets.estimate`:
``t̂_i = exp(logprob_i)`` on the head and ``scale · (count_i / N) · weight_i`` on the sample,
with ``scale = tail_mass`` for hybrid (draws come from the renormalised tail) and ``1``
for sample. The estimate is unbiased for ``sample`` and ``hybrid``; for ``topk`` it is the
exact head and the tail is summarised by ``tail_mass`` alone.

Optionally (a store captured with ``--label-logprobs``) every method also carries ``label_logprobs``:
the teacher's exact log-probability of each position's realized next token, whether or not a head or a
draw holds it (what cross-tokenizer merges need, docs/cross_tokenizer.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .choices import METHODS  # noqa: F401  (re-exported: logitcache.targets.METHODS)
from .errors import TargetsError


@dataclass(frozen=True)
class SparseTargets:
    """Sparse teacher targets for ``T`` consecutive positions of one sequence.

    Attributes:
        method: one of ``topk``, ``sample``, ``hybrid``, ``full``.
        head_ids: ``int32[T, k]`` ids of the head, by descending probability; ``None`` for sample.
        head_logprobs: ``float32[T, k]`` exact teacher log-probabilities of ``head_ids``.
        tail_mass: ``float32[T]`` exact probability mass outside the head (``topk``, ``hybrid``).
        sample_lengths: ``int32[T]`` distinct sampled ids per position; ``None`` without samples.
        sample_ids: ``int32[P]`` distinct sampled ids, ascending within each position.
        sample_counts: ``int32[P]`` draws of each id; per position they sum to ``num_samples``.
        sample_weights: ``float32[P]`` importance weights ``p/q`` (``sample`` with τ ≠ 1), else ``None``.
        num_samples: ``N``, the number of draws per position (0 without samples); with ``sample_totals`` the
            mean over the sequence's positions.
        label_logprobs: ``float32[T]`` exact teacher log-probability of each position's label (its realized
            next token), any method; ``None`` unless the store keeps it (``store.label_logprobs``).
        sample_totals: ``int32[T]`` each position's own number of draws (an adaptive sample budget,
            ``--sample-allocation variance``): its counts sum to it and its estimate divides by it; ``None``
            when every position has ``num_samples``.
    """

    method: str
    head_ids: torch.Tensor | None = None
    head_logprobs: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    sample_lengths: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_counts: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    num_samples: int = 0
    label_logprobs: torch.Tensor | None = None
    sample_totals: torch.Tensor | None = None

    def __post_init__(self) -> None:
        st = self.sample_totals
        if st is not None and (not isinstance(st, torch.Tensor) or st.dim() != 1 or st.is_floating_point()
                               or self.sample_lengths is None or st.shape[0] != self.num_positions):
            found = f"{st.dtype}{list(st.shape)}" if isinstance(st, torch.Tensor) else type(st).__name__
            raise TargetsError(f"sample_totals is {found}; expected an integer tensor of shape [{self.num_positions}] "
                               "(one number of draws per position) on targets with a sample part")
        lp = self.label_logprobs
        if lp is not None and (not isinstance(lp, torch.Tensor) or lp.dim() != 1 or not lp.is_floating_point()
                               or lp.shape[0] != self.num_positions):
            found = f"{lp.dtype}{list(lp.shape)}" if isinstance(lp, torch.Tensor) else type(lp).__name__
            raise TargetsError(f"label_logprobs is {found}; expected a float tensor of shape [{self.num_positions}] "
                               "(one log-probability per position, the label's)")

    @property
    def num_positions(self) -> int:
        if self.head_ids is not None:
            return int(self.head_ids.shape[0])
        if self.sample_lengths is not None:
            return int(self.sample_lengths.shape[0])
        return 0

    @property
    def has_head(self) -> bool:
        return self.head_ids is not None

    def to(self, device: torch.device | str) -> SparseTargets:
        """The same targets with every tensor on ``device`` (the sparsifiers run where the logits are;
        stores encode on the CPU)."""
        device = torch.device(device)
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        if all(t.device == device for t in tensors.values()):  # the CPU capture path: nothing to move
            return self
        return replace(self, **{name: t.to(device) for name, t in tensors.items()})

    @property
    def has_samples(self) -> bool:
        return self.sample_ids is not None

    def _no_sample_part(self) -> TargetsError:
        return TargetsError(f"method {self.method!r} has no sample part; expected targets of method 'sample' or "
                            "'hybrid' (check has_samples before asking for sampled entries)")

    def sample_offsets(self) -> torch.Tensor:
        """``int64[T+1]`` start of each position's entries in the flat sample arrays."""
        if self.sample_lengths is None:
            raise self._no_sample_part()
        lengths = self.sample_lengths.to(torch.int64)
        return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])

    def ids_per_position(self) -> torch.Tensor:
        """``int64[T]`` number of stored ids at each position (head plus sample)."""
        total = torch.zeros(self.num_positions, dtype=torch.int64)
        if self.head_ids is not None:
            total += self.head_ids.shape[1]
        if self.sample_lengths is not None:
            total += self.sample_lengths.to(torch.int64)
        return total

    def sample_estimate(self) -> torch.Tensor:
        """``float32[P]`` the estimate ``scale · count / N · weight`` of each sampled id (``N`` its position's
        own ``sample_totals`` where the budget is adaptive)."""
        if self.sample_counts is None:
            raise self._no_sample_part()
        if self.sample_totals is None:
            est = self.sample_counts.to(torch.float32) / float(self.num_samples)
        else:
            per_entry = torch.repeat_interleave(self.sample_totals.to(torch.float32), self.sample_lengths.to(torch.int64))
            est = self.sample_counts.to(torch.float32) / per_entry
        if self.sample_weights is not None:
            est = est * self.sample_weights
        if self.method == "hybrid":
            scale = torch.repeat_interleave(self.tail_mass, self.sample_lengths.to(torch.int64))
            est = est * scale
        return est

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat ``(offsets int64[T+1], ids int64[E], probs float32[E])`` of ``t̂`` per position.

        Head entries come first at each position, then sampled entries (:meth:`estimate_parts`, interleaved).
        Head and sample ids are disjoint for ``hybrid`` by construction.
        """
        head_ids, head_probs, offsets, ids, probs = self.estimate_parts()
        if head_ids is None:
            return offsets, ids, probs
        k = head_ids.shape[1]
        lengths = offsets[1:] - offsets[:-1] + k
        offsets = torch.cat([offsets.new_zeros(1), torch.cumsum(lengths, 0)])
        if self.sample_ids is None:
            return offsets, head_ids.reshape(-1), head_probs.reshape(-1)
        ids, probs = _interleave(offsets, lengths, k, [(head_ids, ids), (head_probs, probs)])
        return offsets, ids, probs

    def estimate_parts(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor,
                                      torch.Tensor]:
        """``t̂`` in its two parts, not interleaved: the head ``ids int64[T, k]``, ``probs float32[T, k]`` (``None,
        None`` without a head), then the sampled entries as flat ``offsets int64[T+1]``, ``ids int64[P]``, ``probs
        float32[P]`` (no entries without a sample part). :meth:`estimate` puts each position's head block before
        its sampled entries; a consumer that writes per position (the batch layout) can take the parts as
        they are."""
        head_ids = head_probs = None
        if self.head_ids is not None:
            head_ids, head_probs = self.head_ids.to(torch.int64), self.head_logprobs.to(torch.float32).exp()
        if self.sample_ids is None:
            device = None if head_ids is None else head_ids.device
            none = torch.zeros(0, dtype=torch.int64, device=device)
            return (head_ids, head_probs, torch.zeros(self.num_positions + 1, dtype=torch.int64, device=device), none,
                    none.to(torch.float32))
        return (head_ids, head_probs, self.sample_offsets(), self.sample_ids.to(torch.int64),
                self.sample_estimate().to(torch.float32))


def _interleave(offsets: torch.Tensor, lengths: torch.Tensor, k: int, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                *, by_numpy: bool | None = None) -> list[torch.Tensor]:
    """Per ``(head [T, k], rest [E - T·k])`` pair: the flat entries of each position (``offsets``, ``lengths``), its
    ``k`` head entries first, then its share of ``rest`` in order. ``by_numpy`` (default: on the CPU) through
    numpy, where torch's elementwise and masked ops on these sizes are ~2× slower; else by torch ops."""
    if by_numpy is None:
        by_numpy = offsets.device.type == "cpu"
    if by_numpy:
        off = offsets.numpy()
        is_head = np.arange(int(off[-1])) - np.repeat(off[:-1], lengths.numpy()) < k
        out = []
        for head, rest in pairs:
            flat = np.empty(is_head.size, dtype=rest.numpy().dtype)
            flat[is_head], flat[~is_head] = head.reshape(-1).numpy(), rest.numpy()
            out.append(torch.from_numpy(flat))
        return out
    is_head = torch.arange(int(offsets[-1]), device=offsets.device) - torch.repeat_interleave(offsets[:-1], lengths) < k
    out = []
    for head, rest in pairs:
        flat = torch.empty(is_head.numel(), dtype=rest.dtype, device=rest.device)
        flat[is_head], flat[~is_head] = head.reshape(-1), rest
        out.append(flat)
    return out


def concat_targets(parts: list[SparseTargets]) -> SparseTargets:
    """Concatenate targets of consecutive position chunks of one sequence."""
    if not parts:
        raise TargetsError("concat_targets needs at least one part; found an empty list")
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values, 0)

    return SparseTargets(
        method=first.method,
        head_ids=cat("head_ids"),
        head_logprobs=cat("head_logprobs"),
        tail_mass=cat("tail_mass"),
        sample_lengths=cat("sample_lengths"),
        sample_ids=cat("sample_ids"),
        sample_counts=cat("sample_counts"),
        sample_weights=cat("sample_weights"),
        num_samples=first.num_samples,
        label_logprobs=cat("label_logprobs"),
        sample_totals=cat("sample_totals"),
    )
