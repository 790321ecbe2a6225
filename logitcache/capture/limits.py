"""Parameters whose sense depends on the teacher or the plan, checked before any unit is computed.

docs/capture.md "Limits" is the table. A parameter that would silently change what the store
holds is refused (:class:`ConfigError`); one that only changes how the work is cut is accepted as
it is and named in a warning (the ``logitcache`` logger), its effect visible in the manifest.
``seq_len`` above the teacher's positions is refused by :func:`logitcache.capture.plan.build_plan`.
"""

from __future__ import annotations

import logging

from .config import CaptureConfig
from ..errors import ConfigError

log = logging.getLogger("logitcache")


def check_teacher_limits(config: CaptureConfig, vocab_size: int) -> None:
    """Refuse ``k >= vocab_size`` for ``topk``/``hybrid``: the head would hold every token, a full
    store under another name (and hybrid would have no tail left to sample)."""
    cfg = config.sparsify
    if cfg.method in ("topk", "hybrid") and cfg.k >= vocab_size:
        tail = "; hybrid would have no tail left to sample" if cfg.method == "hybrid" else ""
        raise ConfigError(
            f"sparsify.k = {cfg.k} is not below the teacher's vocabulary of {vocab_size} tokens: method "
            f"{cfg.method!r} would keep every token, a full-vocabulary store{tail}. Use --method full for the "
            f"whole distribution, or --k at most {vocab_size - 1}"
        )


def plan_warnings(config: CaptureConfig, plan) -> list[str]:
    """Warn (and return the warnings) where a parameter exceeds what the plan can use."""
    found = []
    per_shard = config.store.sequences_per_shard
    if per_shard > plan.num_sequences:
        found.append(f"sequences_per_shard = {per_shard} exceeds the plan's {plan.num_sequences} sequences: "
                     f"the store has one shard of {plan.num_sequences} (manifest plan.shards = 1)")
    window = plan.seq_len + 1
    if config.batch_tokens < window:
        found.append(f"batch_tokens = {config.batch_tokens} is less than one window (seq_len + 1 = {window} "
                     f"tokens): each forward batch holds one window, {window} tokens")
    for message in found:
        log.warning(message)
    return found


__all__ = ["check_teacher_limits", "plan_warnings"]
