"""Distil with the Hugging Face ``Trainer``: :class:`KDTrainer` and :func:`training_args_defaults`.

::

    ds = CacheDataset("cache/", shuffle=True, seed=0, batch_size=8)
    args = TrainingArguments(output_dir="out", max_steps=1000, per_device_train_batch_size=8,
                             **training_args_defaults())
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, data_collator=ds.collate,
                        kd_alpha=0.5, kd_kind="auto")
    trainer.train()

``data_collator=ds.collate_packed`` trains on padding-free batches instead (the per-device batch's
sequences in one row, :func:`logitcache.train.packing.pack`); the position of a resumed run still
counts sequences. Rows to a token budget: ``CacheDataset(..., pack_tokens=N)`` with
``per_device_train_batch_size=1`` and ``data_collator=ds.collate_rows`` (each micro-batch one row of at
most ``N`` tokens; every epoch has as many rows, so the Trainer's steps per epoch hold); the position
then counts rows.

Notes: the batch carries non-model keys (``target_*``, ``labels``, ``seq_ids``), so the Trainer
must keep every column (``remove_unused_columns=False``) and :meth:`KDTrainer.compute_loss` passes
only the model's keys to the forward. A :class:`~logitcache.train.dataset.CacheDataset` is an ``IterableDataset``:
give ``max_steps``. Under DDP the Trainer's accelerate wrapper does not shard an
``IterableDataset`` that is not split by rank itself; ``CacheDataset`` already splits by rank
(``torch.distributed`` rank and world size), so each process reads its own slice.

Resume (``trainer.train(resume_from_checkpoint=...)``) by position: every checkpoint also gets
``dataset_state.json`` (the dataset's :meth:`~logitcache.train.dataset.CacheDataset.state_dict` after the
micro-batches trained in the current epoch, and the ``global_step`` it belongs to). Resuming from a
checkpoint that has one loads it into the dataset and turns the Trainer's own data skip off for that
run (``ignore_data_skip``), so the epoch continues at the next unseen batch without reading, decoding
and discarding the ones before (the Trainer's default replays them through Accelerate's
``skip_first_batches``). Without the file, with ``ignore_data_skip=True`` set by you, or with gradient
accumulation whose last group of an epoch is partial, the Trainer's replay is left to do the skip:
exact too, only slower.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..errors import ConfigError
from .dataset import CacheDataset
from .losses import kd_loss, resolve_kind
from .packing import student_inputs

__all__ = ["DATASET_STATE_FILE", "KDTrainer", "training_args_defaults"]

DATASET_STATE_FILE = "dataset_state.json"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
log = logging.getLogger("logitcache")


def training_args_defaults() -> dict[str, Any]:
    """``TrainingArguments`` keywords a KD run needs: keep the target columns
    (``remove_unused_columns=False``), no label-name guessing, and no extra loggers."""
    return {"remove_unused_columns": False, "label_names": ["labels"], "report_to": []}


class KDTrainer(transformers.Trainer):
    """A ``Trainer`` whose loss is :func:`logitcache.kd_loss` on collated store batches.

    ``kd_alpha`` and ``kd_kind`` (and ``kd_temperature``) are passed to ``kd_loss``; every other
    argument goes to ``transformers.Trainer``. A :class:`CacheDataset` ``train_dataset`` resumes by
    position (module docstring); its ``batch_size`` must be the Trainer's per-device batch size
    (``None`` adopts it).
    """

    def __init__(self, *args: Any, kd_alpha: float = 0.5, kd_kind: str = "auto", kd_temperature: float = 1.0,
                 **kwargs: Any) -> None:
        resolve_kind(kd_kind, "hybrid")
        if not 0.0 <= kd_alpha <= 1.0:
            raise ConfigError(f"kd_alpha must be in [0, 1]; found {kd_alpha!r}")
        super().__init__(*args, **kwargs)
        self.kd_alpha, self.kd_kind, self.kd_temperature = kd_alpha, kd_kind, kd_temperature
        self._position: _DataPosition | None = None
        if isinstance(self.train_dataset, CacheDataset):
            ds = self.train_dataset
            if ds.pack_tokens is not None and self._train_batch_size != 1:
                raise ConfigError(f"per-device train batch size: found {self._train_batch_size}, expected 1 for a "
                                  f"CacheDataset with pack_tokens={ds.pack_tokens}: each element is already a packed "
                                  "row; pass per_device_train_batch_size=1 and data_collator=ds.collate_rows")
            if ds.batch_size not in (None, self._train_batch_size):
                raise ConfigError(f"CacheDataset batch_size: found {ds.batch_size}, expected {self._train_batch_size} "
                                  "(the Trainer's per-device train batch size, which the dataset's workers "
                                  "interleave by and its resume state counts in)")
            ds.batch_size = self._train_batch_size
            if self.accelerator.dataloader_config.dispatch_batches is None:
                # Accelerate's default for an IterableDataset dispatches: one process reads, and each batch is
                # sliced along its first dimension, a packed row's per-sequence keys (seq_ids, cu_seq_lens) too
                self.accelerator.dataloader_config.dispatch_batches = False
            self._position = _DataPosition(ds)
            self.add_callback(self._position)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``transformers.Trainer.train``; a resume restores the dataset's position from the checkpoint's
        ``dataset_state.json`` and skips no batch by replay (module docstring)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir) or True  # none: the Trainer raises
        if not isinstance(checkpoint, (str, os.PathLike)) or not self._restore_position(Path(checkpoint)):
            return super().train(resume_from_checkpoint, *args, **kwargs)
        replay, self.args.ignore_data_skip = self.args.ignore_data_skip, True
        try:
            return super().train(str(checkpoint), *args, **kwargs)
        finally:
            self.args.ignore_data_skip = replay

    def _restore_position(self, checkpoint: Path) -> bool:
        """Load ``checkpoint``'s dataset position into the dataset; False where the Trainer's replay must skip."""
        saved = checkpoint / DATASET_STATE_FILE
        if self._position is None or self.args.ignore_data_skip:
            return False
        if not saved.is_file():
            log.info("%s has no %s: the Trainer replays the batches trained in this epoch", checkpoint,
                     DATASET_STATE_FILE)
            return False
        ds, accumulation = self._position.dataset, self.args.gradient_accumulation_steps
        per_epoch = len(ds) // ds.batch_size if self.args.dataloader_drop_last else math.ceil(len(ds) / ds.batch_size)
        if per_epoch % accumulation:
            log.warning("%d batches per epoch is not a multiple of gradient_accumulation_steps=%d: the Trainer "
                        "replays the batches trained in this epoch instead of resuming by position",
                        per_epoch, accumulation)
            return False
        state = json.loads(saved.read_text())
        step = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["global_step"]
        if state.get("global_step") != step:
            raise ConfigError(f"{saved}: global_step found {state.get('global_step')!r}, expected {step} (from "
                              f"{TRAINER_STATE_FILE} in the same checkpoint); the dataset position belongs to "
                              "another step. Remove the file to let the Trainer replay the skipped batches.")
        ds.load_state_dict(state["dataset"])
        return True

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """Forward the model keys only (:func:`~logitcache.train.packing.student_inputs`: ``input_ids`` and
        ``attention_mask`` of a padded batch, ``input_ids``/``position_ids``/``cu_seq_lens`` of a packed one),
        then ``kd_loss`` on the logits and the batch.

        The loss is a mean over this batch's labelled tokens (``num_items_in_batch`` is not used: with
        gradient accumulation each micro-batch weighs the same, as with ``average_tokens_across_devices=False``).
        """
        outputs = model(**student_inputs(inputs))
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = kd_loss(logits, inputs, alpha=self.kd_alpha, kind=self.kd_kind, temperature=self.kd_temperature)
        return (loss, outputs) if return_outputs else loss


class _DataPosition(transformers.TrainerCallback):
    """Counts the micro-batches trained since the epoch began (the batches the dataset handed out since its
    last ``set_epoch`` or ``load_state_dict``) and writes the dataset's position into every checkpoint."""

    def __init__(self, dataset: CacheDataset) -> None:
        self.dataset, self.batches = dataset, 0

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.batches = 0

    def on_substep_end(self, args, state, control, **kwargs) -> None:
        self.batches += 1

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.batches += 1

    def on_save(self, args, state, control, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        saved = {"global_step": state.global_step, "dataset": self.dataset.state_dict(batches_consumed=self.batches)}
        tmp = folder / f"{DATASET_STATE_FILE}.tmp"
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, folder / DATASET_STATE_FILE)
