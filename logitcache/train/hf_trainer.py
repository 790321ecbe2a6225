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

Cross-tokenizer (a student with another tokenizer than the store's, docs/cross_tokenizer.md)::

    ds = CacheDataset("cache/", shuffle=True, seed=0, batch_size=8,
                      tokenizer_fingerprint=tokenizer_fingerprints(teacher_tokenizer))
    transform = CrossTokenizerTransform(teacher_tokenizer, student_tokenizer, store="cache/")
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, cross_tokenizer=transform, kd_alpha=0.5)

The loader then collates with ``transform.collate`` (give no other ``data_collator``) and the loss is
:func:`~logitcache.train.losses_xtok.cross_tokenizer_kd_loss` (``kd_matched_weight``,
``kd_unmatched_weight``); ``kd_kind`` stays ``auto``. Batches are padded ``[B, T]`` in the student's tokens:
a dataset with ``pack_tokens`` (rows to a token budget) is refused; train with ``batch_size`` instead.

Notes: the batch carries non-model keys (``target_*``, ``labels``, ``seq_ids``), so the Trainer
must keep every column (``remove_unused_columns=False``) and :meth:`KDTrainer.compute_loss` passes
only the model's keys to the forward. A :class:`~logitcache.train.dataset.CacheDataset` is an ``IterableDataset``:
give ``max_steps``.

DDP (``torchrun``, ``accelerate launch``): a ``CacheDataset`` already splits the epoch by rank (its
``world``, from ``torch.distributed`` or ``RANK``/``WORLD_SIZE``), and every rank yields as many batches.
The Trainer's own loader would split it again: Accelerate's ``prepare_data_loader`` either dispatches
(rank 0 reads *its* slice and hands each rank a piece of every batch, ``DataLoaderDispatcher``) or wraps
the dataset in ``IterableDatasetShard`` (each rank keeps every ``world_size``-th batch of its own slice);
either way the ranks together read ``1/world_size`` of the epoch. :meth:`KDTrainer.get_train_dataloader`
therefore prepares the loader of a ``CacheDataset`` as Accelerate does for one process: a
``DataLoaderShard`` over the dataset itself (batches put on the device, ``set_epoch`` forwarded, the end
of the epoch reported to Accelerate's ``GradientState``), so each rank trains on exactly its own slice.
The dataset's world must be Accelerate's (rank, processes), and batch dispatching and splitting
(``accelerator_config`` ``dispatch_batches``/``split_batches``; dispatching would also slice a packed row's
per-sequence keys) are refused. The loader keeps the workers' order (what resume by position counts), uses
the collator as given and honours ``dataloader_drop_last``.

Resume (``trainer.train(resume_from_checkpoint=...)``) by position: every checkpoint also gets
``dataset_state.json`` (the dataset's :meth:`~logitcache.train.dataset.CacheDataset.state_dict` after the
micro-batches trained in the current epoch, and the ``global_step`` it belongs to). Resuming from a
checkpoint that has one loads it into the dataset and turns the Trainer's own data skip off for that
run (``ignore_data_skip``), so the epoch continues at the next unseen batch without reading, decoding
and discarding the ones before (the Trainer's default replays them through Accelerate's
``skip_first_batches``). Without the file, with ``ignore_data_skip=True`` set by you, or with gradient
accumulation whose last group of an epoch is partial, the Trainer's replay is left to do the skip:
exact too, only slower: Accelerate's ``skip_first_batches`` builds a ``DataLoaderShard`` over the same
dataset with ``skip_batches=k``, which reads, decodes and drops the epoch's first ``k`` batches of each
rank's own slice. Under DDP every rank loads the same ``dataset_state.json`` (written by rank 0): the
ranks step in lockstep over slices of equal length, so rank 0's position is every rank's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import transformers
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..choices import LOSS_IMPLS
from ..errors import ConfigError
from .collate import send_batches_by_name
from .cross_tokenizer import CrossTokenizerTransform
from .dataset import CacheDataset
from .losses import kd_loss, resolve_kind
from .losses_xtok import check_xtok_args, cross_tokenizer_kd_loss
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

    ``kd_alpha``, ``kd_kind``, ``kd_temperature`` and ``kd_impl`` (``plain`` or ``compiled``) are passed to
    ``kd_loss`` (as ``alpha``, ``kind``, ``temperature``, ``impl``); every other
    argument goes to ``transformers.Trainer``. ``cross_tokenizer`` (a
    :class:`~logitcache.train.cross_tokenizer.CrossTokenizerTransform`) trains a student with another tokenizer
    (module docstring) with ``cross_tokenizer_kd_loss(alpha=kd_alpha, matched_weight=kd_matched_weight,
    unmatched_weight=kd_unmatched_weight, temperature=kd_temperature)``. A :class:`CacheDataset`
    ``train_dataset`` resumes by
    position (module docstring); its ``batch_size`` must be the Trainer's per-device batch size
    (``None`` adopts it).
    """

    def __init__(self, *args: Any, kd_alpha: float = 0.5, kd_kind: str = "auto", kd_temperature: float = 1.0,
                 kd_impl: str = "plain", cross_tokenizer: CrossTokenizerTransform | None = None, kd_matched_weight: float = 1.0,
                 kd_unmatched_weight: float = 1.0, **kwargs: Any) -> None:
        resolve_kind(kd_kind, "hybrid")
        if kd_impl not in LOSS_IMPLS or (cross_tokenizer is not None and kd_impl != "plain"):
            raise ConfigError(f"kd_impl must be one of {', '.join(LOSS_IMPLS)} (plain with cross_tokenizer: the "
                              f"cross-tokenizer loss has no compiled form); found {kd_impl!r}")
        if not 0.0 <= kd_alpha <= 1.0:
            raise ConfigError(f"kd_alpha must be in [0, 1]; found {kd_alpha!r}")
        if cross_tokenizer is not None:
            check_xtok_args(kd_alpha, kd_temperature, kd_matched_weight, kd_unmatched_weight)
            kwargs["data_collator"] = _xtok_collator(cross_tokenizer, kd_kind, kwargs.get("data_collator"))
        super().__init__(*args, **kwargs)
        self.kd_alpha, self.kd_kind, self.kd_temperature, self.kd_impl = kd_alpha, kd_kind, kd_temperature, kd_impl
        self.cross_tokenizer, self.kd_weights = cross_tokenizer, (kd_matched_weight, kd_unmatched_weight)
        self._position: _DataPosition | None = None
        if isinstance(self.train_dataset, CacheDataset):
            ds = self.train_dataset
            _check_dataset(ds, self._train_batch_size, self.accelerator)
            if cross_tokenizer is not None:
                _check_xtok_dataset(ds, cross_tokenizer)
            ds.batch_size = self._train_batch_size
            self._position = _DataPosition(ds)
            self.add_callback(self._position)

    def get_train_dataloader(self) -> DataLoader:
        """The training loader; over a :class:`CacheDataset`, Accelerate's loader of one process over the
        dataset itself, which each rank reads its own slice of (module docstring, "DDP")."""
        if self._position is None:
            return super().get_train_dataloader()
        args, accelerator = self.args, self.accelerator
        context = getattr(args, "dataloader_multiprocessing_context", None)  # an argument of recent transformers
        loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                            drop_last=args.dataloader_drop_last, num_workers=args.dataloader_num_workers,
                            pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers,
                            prefetch_factor=args.dataloader_prefetch_factor,
                            multiprocessing_context=context,
                            worker_init_fn=send_batches_by_name if args.dataloader_num_workers else None)
        return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=accelerator.device_placement, rng_types=list(accelerator.rng_types),
                                   dispatch_batches=False, non_blocking=accelerator.non_blocking,
                                   use_stateful_dataloader=accelerator.use_stateful_dataloader)

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
        if self.cross_tokenizer is not None:
            loss = cross_tokenizer_kd_loss(logits, inputs, alpha=self.kd_alpha, matched_weight=self.kd_weights[0],
                                           unmatched_weight=self.kd_weights[1], temperature=self.kd_temperature)
        else:
            loss = kd_loss(logits, inputs, alpha=self.kd_alpha, kind=self.kd_kind, temperature=self.kd_temperature,
                           impl=self.kd_impl)
        return (loss, outputs) if return_outputs else loss


def _xtok_collator(transform: CrossTokenizerTransform, kind: str, given: Any) -> Any:
    """The collator of a cross-tokenizer run: the transform's; refuses another collator or loss kind."""
    if kind != "auto":
        raise ConfigError(f"kd_kind: found {kind!r}, expected 'auto' with cross_tokenizer: the cross-tokenizer loss is "
                          "its own (exact-match KL + ULD); weigh its terms with kd_matched_weight and "
                          "kd_unmatched_weight")
    if given is not None and given != transform.collate:
        raise ConfigError(f"data_collator: found {given!r}, expected none (or cross_tokenizer.collate) with "
                          "cross_tokenizer: the batches must be in the student's tokens; remove data_collator")
    return transform.collate


def _check_xtok_dataset(ds: CacheDataset, transform: CrossTokenizerTransform) -> None:
    """Refuse a dataset a cross-tokenizer run cannot read: packed rows, or a store of another teacher tokenizer."""
    if ds.pack_tokens is not None:
        raise ConfigError(f"CacheDataset pack_tokens: found {ds.pack_tokens}, expected None with cross_tokenizer: "
                          "cross-tokenizer batches are padded [B, T] in the student's tokens (packed student rows "
                          "are not supported); build the dataset without pack_tokens and set the batch size")
    transform.check_store(ds.path)


def _check_dataset(ds: CacheDataset, batch_size: int, accelerator: Accelerator) -> None:
    """Refuse a ``CacheDataset`` the Trainer cannot read as it is: another batch size, another world than
    Accelerate's, or Accelerate set to dispatch or split batches."""
    if ds.pack_tokens is not None and batch_size != 1:
        raise ConfigError(f"per-device train batch size: found {batch_size}, expected 1 for a CacheDataset with "
                          f"pack_tokens={ds.pack_tokens}: each element is already a packed row; pass "
                          "per_device_train_batch_size=1 and data_collator=ds.collate_rows")
    if ds.batch_size not in (None, batch_size):
        raise ConfigError(f"CacheDataset batch_size: found {ds.batch_size}, expected {batch_size} (the Trainer's "
                          "per-device train batch size, which the dataset's workers interleave by and its resume "
                          "state counts in)")
    found, expected = (ds.world.rank, ds.world.world_size), (accelerator.process_index, accelerator.num_processes)
    if found != expected:
        raise ConfigError(f"CacheDataset world: found rank {found[0]} of {found[1]}, expected rank {expected[0]} of "
                          f"{expected[1]} (Accelerate's process); each rank trains on the dataset's own slice. "
                          "Construct the dataset in each process with world=None (detected) or that World.")
    config = accelerator.dataloader_config
    for name in ("dispatch_batches", "split_batches"):
        if getattr(config, name):
            raise ConfigError(f"accelerator_config {name}: found True, expected unset or False with a CacheDataset: "
                              "each rank reads its own slice of the epoch in whole batches; remove the setting")


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
