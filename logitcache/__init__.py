"""logitcache: capture a teacher's sparse next-token targets once, stream them to any student.

Stages by package, data flowing one way (docs/architecture.md): ``capture`` (corpus, plan,
teachers, sparsify, the pipeline and its Ray job) writes through ``store`` (manifest, commits,
codecs, containers, reader, writer, convert), which ``train`` (dataset, losses, trainers) reads.
``cli`` orchestrates; ``models``, ``targets``, ``errors``, ``choices``, ``jobfile`` and ``faults``
are shared by all.

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
    "CacheDataset": "train.dataset",
    "CacheView": "train.dataset",
    "World": "train.world",
    "collate": "train.collate",
    "kd_loss": "train.losses",
    "sparse_kd_loss": "train.losses",
    "ghost_kd_loss": "train.losses",
    "full_kd_loss": "train.losses",
    "KDLoss": "train.losses",
    "chunked_kd_loss": "train.losses_chunked",
    "ChunkedKDLoss": "train.losses_chunked",
    "KDTrainer": "train.hf_trainer",
    "SparseTargets": "targets",
    "CaptureConfig": "capture.config",
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
