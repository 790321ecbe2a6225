"""The capture stage: corpus → plan → teacher → sparsify → store, exactly once per unit.

Rooms: ``corpus`` (readers), ``plan`` (deterministic work units), ``teachers/`` (HF and vLLM
backends), ``sparsify`` (pure torch sparsifiers), ``pipeline`` (the one-process loop) and
``distributed`` (the same units on Ray actors). :func:`capture` picks between the last two.

Submodules are imported on first use, so ``import logitcache.capture.config`` stays cheap.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import CaptureConfig
    from .pipeline import CaptureSummary
    from .teachers import Teacher


def capture(config: CaptureConfig, *, overwrite: bool = False, progress: bool = True,
            teacher: Teacher | None = None) -> CaptureSummary:
    """Capture sparse targets for ``config``; resumes an interrupted store with the same configuration.

    With ``config.workers`` >= 1 (and no ``teacher`` given) the units run on that many Ray actors
    (:mod:`logitcache.capture.distributed`); otherwise in this process
    (:func:`logitcache.capture.pipeline.capture_local`). Either way the store's bytes are the same.
    """
    if config.workers and teacher is None:
        from .distributed import capture_distributed

        return capture_distributed(config, overwrite=overwrite, progress=progress)
    from .pipeline import capture_local

    return capture_local(config, overwrite=overwrite, progress=progress, teacher=teacher)


class _CallableModule(types.ModuleType):
    """``logitcache.capture(config)`` was the public function before this package existed: the
    package itself stays callable so that spelling keeps working."""

    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["capture"]
