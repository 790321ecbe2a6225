"""This thread's zstd decompression context, made once and reused (a ``zstandard`` context is not shared across
threads). Making one per frame, as one-shot calls do (pyarrow's buffers, numcodecs' chunks), costs more than
decompressing a small frame: ~10 µs a context on the benchmark VM (docs/benchmarks.md)."""

from __future__ import annotations

import threading

import zstandard

__all__ = ["decompressor"]

_LOCAL = threading.local()


def decompressor() -> zstandard.ZstdDecompressor:
    context = getattr(_LOCAL, "zstd", None)
    if context is None:
        context = _LOCAL.zstd = zstandard.ZstdDecompressor()
    return context
