"""logitcache: capture a teacher's sparse next-token targets once, stream them to any student.

Public names are imported lazily on first use, so ``import logitcache`` is cheap and never
imports vllm, ray or transformers.

    ds = logitcache.CacheDataset("cache/", shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=ds.collate)
    loss = logitcache.kd_loss(student(batch["input_ids"]).logits, batch, alpha=0.5)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CacheDataset": "dataset",
    "CacheView": "dataset",
    "World": "world",
    "collate": "collate",
    "kd_loss": "losses",
    "sparse_kd_loss": "losses",
    "ghost_kd_loss": "losses",
    "full_kd_loss": "losses",
    "KDLoss": "losses",
    "chunked_kd_loss": "losses_chunked",
    "ChunkedKDLoss": "losses_chunked",
    "SparseTargets": "targets",
    "CaptureConfig": "config",
    "capture": "capture",
    "open_hf_dataset": "store",
    "iter_sequences": "store",
    "inspect_store": "store",
    "verify_store": "store",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'logitcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
