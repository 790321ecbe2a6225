"""Distil with the Hugging Face ``Trainer``: :class:`KDTrainer` and :func:`training_args_defaults`.

::

    ds = CacheDataset("cache/", shuffle=True, seed=0, batch_size=8)
    args = TrainingArguments(output_dir="out", max_steps=1000, per_device_train_batch_size=8,
                             **training_args_defaults())
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, data_collator=ds.collate,
                        kd_alpha=0.5, kd_kind="auto")
    trainer.train()

Notes: the batch carries non-model keys (``target_*``, ``labels``, ``seq_ids``), so the Trainer
must keep every column (``remove_unused_columns=False``) and :meth:`KDTrainer.compute_loss` pops
them before the forward. A :class:`~logitcache.train.dataset.CacheDataset` is an ``IterableDataset``:
give ``max_steps``. Under DDP the Trainer's accelerate wrapper does not shard an
``IterableDataset`` that is not split by rank itself; ``CacheDataset`` already splits by rank
(``torch.distributed`` rank and world size), so each process reads its own slice.
"""

from __future__ import annotations

from typing import Any

import transformers

from ..errors import ConfigError
from .losses import kd_loss, resolve_kind

__all__ = ["KDTrainer", "MODEL_KEYS", "training_args_defaults"]

MODEL_KEYS = ("input_ids", "attention_mask")


def training_args_defaults() -> dict[str, Any]:
    """``TrainingArguments`` keywords a KD run needs: keep the target columns
    (``remove_unused_columns=False``), no label-name guessing, and no extra loggers."""
    return {"remove_unused_columns": False, "label_names": ["labels"], "report_to": []}


class KDTrainer(transformers.Trainer):
    """A ``Trainer`` whose loss is :func:`logitcache.kd_loss` on collated store batches.

    ``kd_alpha`` and ``kd_kind`` (and ``kd_temperature``) are passed to ``kd_loss``; every other
    argument goes to ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, kd_alpha: float = 0.5, kd_kind: str = "auto", kd_temperature: float = 1.0,
                 **kwargs: Any) -> None:
        resolve_kind(kd_kind, "hybrid")
        if not 0.0 <= kd_alpha <= 1.0:
            raise ConfigError(f"kd_alpha must be in [0, 1]; found {kd_alpha!r}")
        super().__init__(*args, **kwargs)
        self.kd_alpha, self.kd_kind, self.kd_temperature = kd_alpha, kd_kind, kd_temperature

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """Forward ``input_ids``/``attention_mask`` only, then ``kd_loss`` on the logits and the batch.

        The loss is a mean over this batch's labelled tokens (``num_items_in_batch`` is not used: with
        gradient accumulation each micro-batch weighs the same, as with ``average_tokens_across_devices=False``).
        """
        batch = dict(inputs)
        model_inputs = {key: batch.pop(key) for key in MODEL_KEYS if key in batch}
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = kd_loss(logits, batch, alpha=self.kd_alpha, kind=self.kd_kind, temperature=self.kd_temperature)
        return (loss, outputs) if return_outputs else loss
