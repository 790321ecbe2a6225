"""Sampling one next token from logits, and deciding when a response ends: the reference generation rules.

The HF backend generates with these (:meth:`~logitcache.capture.teachers.hf.HFTeacher.generate`); vLLM
applies the same settings with its own sampler and per-request generators (so its sampled tokens are
not these), and :meth:`StopRule.replay` ends its responses by this module's rule. Per step, from the
logits of the last position:

- ``temperature`` 0: the argmax (the lowest id among ties), no random draw;
- else scores ``logits / temperature`` (float64); ``top_k`` > 0 keeps the scores ``>=`` the k-th largest
  (ties at the k-th kept); softmax; ``top_p`` < 1 keeps, in descending probability (ties by id), the
  tokens whose preceding mass is below ``top_p`` (at least one); then one uniform ``u`` in [0, 1) from
  the sequence's own ``torch.Generator`` picks the token by inverse CDF over the kept, unnormalised
  probabilities in that order.

A response ends (:class:`StopRule`) after the token that is a stop id (``stop``), else after the token
with which the decoded response text first contains a stop string (``stop-string``, the lowest index
if several appear at once), else at ``max_new_tokens`` (``length``). The ending token stays in the
response in every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Generation


def sample_token(logits: torch.Tensor, settings: Any, generator: torch.Generator) -> int:
    """The next token from ``logits [V]`` under ``settings`` (a GenerateConfig), drawing from ``generator``."""
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.detach().to("cpu", torch.float64) / settings.temperature
    if 0 < settings.top_k < scores.numel():
        scores = scores.masked_fill(scores < torch.topk(scores, settings.top_k).values[-1], float("-inf"))
    probs = torch.softmax(scores, dim=0)
    order = torch.argsort(-probs, stable=True)
    kept = probs[order]
    if settings.top_p < 1:
        kept = torch.where(torch.cumsum(kept, 0) - kept < settings.top_p, kept, torch.zeros_like(kept))
    cdf = torch.cumsum(kept, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return int(order[min(int(torch.searchsorted(cdf, u, right=True)), order.numel() - 1)])


class StopRule:
    """When a response ends (see the module docstring): ``stop_ids``, ``settings.stop`` strings decoded with
    ``tokenizer`` (special tokens kept), ``settings.max_new_tokens``."""

    def __init__(self, settings: Any, stop_ids: Sequence[int], tokenizer: Any) -> None:
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.stop, self.limit, self.tokenizer = tuple(settings.stop), settings.max_new_tokens, tokenizer

    def finish(self, tokens: list[int]) -> Generation | None:
        """The finished :class:`Generation` once ``tokens`` (the response so far) ends it, else None."""
        if tokens[-1] in self.stop_ids:
            return self._done(tokens, "stop")
        if self.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            hit = next((i for i, s in enumerate(self.stop) if s in text), None)
            if hit is not None:
                return self._done(tokens, "stop-string", hit)
        return self._done(tokens, "length") if len(tokens) >= self.limit else None

    def replay(self, tokens: Sequence[int]) -> Generation | None:
        """The :class:`Generation` this rule makes of a response another sampler wrote: ``tokens`` up to the
        first prefix that :meth:`finish` ends (the rest dropped), or None when no prefix ends it."""
        tokens = [int(t) for t in tokens]
        return next((done for n in range(1, len(tokens) + 1) if (done := self.finish(tokens[:n])) is not None),
                    None)

    @staticmethod
    def _done(tokens: list[int], finish: str, stop_string: int | None = None) -> Generation:
        return Generation(np.asarray(tokens, dtype=np.int32), finish, stop_string)


__all__ = ["StopRule", "sample_token"]
