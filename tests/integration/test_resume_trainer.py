"""HF ``Trainer`` resume with :class:`KDTrainer`: a run interrupted after ``k`` steps (checkpoint saved)
and resumed trains on exactly the sequences the uninterrupted run trains on after step ``k``, ends
with the same weights, and does not decode the batches it skips (they are skipped by position).
Tiny 1-layer student, 20 sequences in batches of 4 (5 batches per epoch), 8 steps: the runs cross
an epoch boundary."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_store, train_counting_decodes

from logitcache.errors import ConfigError
from logitcache.train.dataset import CacheDataset, CacheView
from logitcache.train.hf_trainer import DATASET_STATE_FILE, KDTrainer
from logitcache.train.loop import make_student

SEQUENCES, BATCH, STEPS = 20, 4, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tiny_teacher, tmp_path_factory) -> str:
    return tiny_store(tiny_teacher, tmp_path_factory.mktemp("trainer_resume") / "store", SEQUENCES, 6)


class Recording(KDTrainer):
    """A KDTrainer that records the seq_ids of every micro-batch it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []

    def training_step(self, model, inputs, *args, **kwargs):
        self.seen.append(inputs["seq_ids"].tolist())
        return super().training_step(model, inputs, *args, **kwargs)


class StopAt:
    """A callback that ends training after ``step`` optimizer steps (the interruption)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True

        return _Stop()


def run(store, teacher, out, *, stop=None, resume=False, workers=0, accumulation=1):
    """One ``trainer.train()``; returns the trainer, the student and how many sequences it decoded."""
    from transformers import TrainingArguments

    student = make_student(f"init:{teacher}:1")
    ds = CacheDataset(store, shuffle=True, seed=7, batch_size=BATCH)
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        gradient_accumulation_steps=accumulation, remove_unused_columns=False, report_to=[], use_cpu=True,
        dataloader_num_workers=workers, disable_tqdm=True, logging_strategy="no",
        save_strategy="steps" if stop else "no", save_steps=stop or 1, seed=0)
    trainer = Recording(model=student, args=args, train_dataset=ds, data_collator=ds.collate, kd_alpha=0.5,
                        callbacks=[StopAt(stop)] if stop else None)
    decoded = train_counting_decodes(trainer, resume=resume)
    return trainer, student, decoded


@pytest.fixture(scope="module")
def uninterrupted(store, tiny_teacher, tmp_path_factory):
    trainer, student, _ = run(store, tiny_teacher, tmp_path_factory.mktemp("whole"))
    assert trainer.state.global_step == STEPS and len(trainer.seen) == STEPS
    view = CacheView(store)  # reference: epoch 0 in full, then the start of epoch 1, in the dataset's order
    order = [[view[int(i)]["seq_id"] for i in CacheDataset(store, shuffle=True, seed=7, epoch=e).indices()]
             for e in (0, 1)]
    assert [s for batch in trainer.seen for s in batch] == order[0] + order[1][:3 * BATCH]
    return trainer.seen, {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("k", [2, 5, 7])  # mid-epoch 0, the epoch boundary, mid-epoch 1
def test_resumed_trainer_trains_on_exactly_the_remaining_batches(store, tiny_teacher, tmp_path, uninterrupted, k):
    seen, weights = uninterrupted
    first, _, _ = run(store, tiny_teacher, tmp_path, stop=k)
    assert first.seen == seen[:k]
    saved = json.loads((tmp_path / f"checkpoint-{k}" / DATASET_STATE_FILE).read_text())
    assert saved["global_step"] == k
    # the epoch of the k-th batch, and the sequences through it (at the boundary: all of epoch 0)
    assert (saved["dataset"]["epoch"], saved["dataset"]["consumed"]) == ((k - 1) // 5, ((k - 1) % 5 + 1) * BATCH)

    resumed, student, decoded = run(store, tiny_teacher, tmp_path, resume=True)
    assert resumed.state.global_step == STEPS
    assert resumed.seen == seen[k:]
    assert decoded <= (STEPS - k + 1) * BATCH  # the batches trained, plus Accelerate's one look-ahead
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6, msg=name)


def test_resume_with_loader_workers(store, tiny_teacher, tmp_path, uninterrupted):
    seen, _ = uninterrupted
    run(store, tiny_teacher, tmp_path, stop=3, workers=2)
    resumed, _, _ = run(store, tiny_teacher, tmp_path, resume=True, workers=2)
    assert resumed.seen == seen[3:]


def test_partial_accumulation_group_falls_back_to_the_exact_replay(store, tiny_teacher, tmp_path_factory):
    """5 batches per epoch, accumulation 2: the last group of an epoch is partial, so the Trainer's own
    replay skips (by position the resumed epoch would lose its last optimizer step)."""
    whole, _, _ = run(store, tiny_teacher, tmp_path_factory.mktemp("whole_acc"), accumulation=2)
    out = tmp_path_factory.mktemp("cut_acc")
    run(store, tiny_teacher, out, stop=2, accumulation=2)
    resumed, _, decoded = run(store, tiny_teacher, out, resume=True, accumulation=2)
    assert resumed.state.global_step == STEPS and resumed.seen == whole.seen[4:]
    assert decoded > (2 * STEPS - 4 + 1) * BATCH  # replayed: the skipped batches were decoded


def test_a_dataset_state_of_another_step_is_refused(store, tiny_teacher, tmp_path):
    run(store, tiny_teacher, tmp_path, stop=3)
    saved = tmp_path / "checkpoint-3" / DATASET_STATE_FILE
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "global_step": 2}))
    with pytest.raises(ConfigError, match=r"dataset_state\.json: global_step found 2, expected 3"):
        run(store, tiny_teacher, tmp_path, resume=True)


def test_dataset_batch_size_must_be_the_trainers(store, tiny_teacher, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH,
                             remove_unused_columns=False, report_to=[], use_cpu=True)
    ds = CacheDataset(store, batch_size=2 * BATCH)
    with pytest.raises(ConfigError, match=f"batch_size: found {2 * BATCH}, expected {BATCH}"):
        KDTrainer(model=make_student(f"init:{tiny_teacher}:1"), args=args, train_dataset=ds,
                  data_collator=ds.collate)
    ds = CacheDataset(store)
    KDTrainer(model=make_student(f"init:{tiny_teacher}:1"), args=args, train_dataset=ds, data_collator=ds.collate)
    assert ds.batch_size == BATCH  # adopted
