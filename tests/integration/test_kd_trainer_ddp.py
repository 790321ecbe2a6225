""":class:`KDTrainer` under DDP: two processes on gloo (forked with the environment ``torchrun`` gives its
workers), each a real ``transformers.Trainer`` with Accelerate, on a padded store and on token-budget rows of a
chat store. Each compute_loss records the ``seq_ids`` it trains on and Accelerate's ``end_of_dataloader``.

The reference is the store itself (``iter_sequences``): over the ranks, the micro-batches of one epoch hold
every sequence of the store exactly once, no sequence on two ranks, and every rank takes as many steps. A run
checkpointed after ``k`` steps and resumed trains, on each rank, on exactly the batches the uninterrupted run
trains on after step ``k``, without decoding the ones before. One subprocess runs every training below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from helpers import free_port, make_config, subprocess_env, tiny_store, write_chat_corpus

from logitcache.capture.pipeline import capture_local
from logitcache.errors import ConfigError
from logitcache.store.reader import iter_sequences
from logitcache.train.dataset import CacheDataset
from logitcache.train.world import World

RANKS = 2
SEQUENCES, BATCH = 20, 2  # padded: 5 batches per rank and epoch
EPOCH = SEQUENCES // (RANKS * BATCH)
STEPS, CUT = EPOCH + 2, 3  # into the second epoch; the interrupted run stops mid-epoch 0
BUDGET = 200  # token-budget rows of the chat store (12 rows: 6 per rank)
SEED = 7

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.multiprocessing as mp


    def train(spec):
        import torch.distributed as dist
        from transformers import TrainerCallback, TrainingArguments
        from logitcache.train.store_reads import Store
        from logitcache.train.dataset import CacheDataset
        from logitcache.train.hf_trainer import KDTrainer, training_args_defaults
        from logitcache.train.loop import make_student

        seen, ends, decoded = [], [], [0]

        class Recording(KDTrainer):
            def compute_loss(self, model, inputs, *args, **kwargs):
                seen.append(inputs["seq_ids"].tolist())
                ends.append(self.accelerator.gradient_state.end_of_dataloader)
                return super().compute_loss(model, inputs, *args, **kwargs)

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == spec["stop"]:
                    control.should_training_stop = True

        ds = CacheDataset(spec["store"], shuffle=True, seed=spec["seed"], pack_tokens=spec["pack_tokens"])
        args = TrainingArguments(
            output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
            gradient_accumulation_steps=spec["accumulation"], learning_rate=1e-3, use_cpu=True, disable_tqdm=True,
            logging_strategy="no", save_strategy="steps" if spec["stop"] else "no", save_steps=spec["stop"] or 1,
            seed=0, **training_args_defaults())
        collate = ds.collate_rows if spec["pack_tokens"] else ds.collate
        trainer = Recording(model=make_student(spec["student"]), args=args, train_dataset=ds, data_collator=collate,
                            kd_alpha=0.5, callbacks=[Stop()])
        real_item = Store.item

        def counting_item(self, index):
            decoded[0] += 1
            return real_item(self, index)

        Store.item = counting_item
        try:
            trainer.train(resume_from_checkpoint=True if spec["resume"] else None)
        finally:
            Store.item = real_item
        dist.barrier()  # rank 0's checkpoint is complete before any rank resumes from it
        return {"seen": seen, "ends": ends, "decoded": decoded[0], "global_step": trainer.state.global_step,
                "world": [ds.world.rank, ds.world.world_size]}


    def worker(rank, plan, out, port):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        results = {name: train(spec) for name, spec in plan.items()}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


    if __name__ == "__main__":
        plan, out, port = json.loads(open(sys.argv[1]).read()), sys.argv[2], int(sys.argv[3])
        from logitcache.train.hf_trainer import KDTrainer  # imported once, inherited by the forked ranks
        mp.start_processes(worker, args=(plan, out, port), nprocs=2, join=True, start_method="fork")
""")


@pytest.fixture(scope="module")
def padded_store(tiny_teacher, tmp_path_factory) -> str:
    return tiny_store(tiny_teacher, tmp_path_factory.mktemp("ddp_padded") / "store", SEQUENCES, 6)


@pytest.fixture(scope="module")
def chat_store(tiny_teacher, tmp_path_factory) -> str:
    """A documents store of 16 conversations of varied lengths (more sequences once the long ones are split)."""
    folder = tmp_path_factory.mktemp("ddp_chat")
    words = "list tuple dict set loop while for break class function return yield import module".split()
    rows = [{"messages": [
        {"role": "user", "content": " ".join(words[(i + j) % len(words)] for j in range(2 + i % 5)) + "?"},
        {"role": "assistant", "content": " ".join(words[(3 * i + j) % len(words)] for j in range(3 + 7 * i % 11))}]}
        for i in range(16)]
    path, template = write_chat_corpus(folder, rows)
    config = make_config(tiny_teacher, folder / "store", method="topk", **{
        "corpus.source": str(path), "corpus.max_tokens": None, "corpus.seq_len": 120,
        "corpus.long_sequences": "split", "corpus.chat_template": str(template), "store.sequences_per_shard": 4})
    return str(capture_local(config, progress=False).store)


@pytest.fixture(scope="module")
def runs(padded_store, chat_store, tiny_teacher, tmp_path_factory) -> dict[str, list[dict]]:
    """Every DDP training, in one 2-process launch: name -> the result of rank 0 and of rank 1."""
    folder = tmp_path_factory.mktemp("ddp_runs")
    base = {"store": padded_store, "student": f"init:{tiny_teacher}:1", "pack_tokens": None, "batch": BATCH,
            "steps": STEPS, "accumulation": 1, "stop": None, "resume": False, "seed": SEED}
    rows = len(CacheDataset(chat_store, pack_tokens=BUDGET, world=World(0, RANKS)))
    packed = {**base, "store": chat_store, "pack_tokens": BUDGET, "batch": 1, "steps": rows + 1}
    plan = {
        "padded": {**base, "out": str(folder / "padded")},
        "padded_cut": {**base, "out": str(folder / "padded_cut"), "stop": CUT},
        "padded_resumed": {**base, "out": str(folder / "padded_cut"), "resume": True},
        "accumulated": {**base, "out": str(folder / "acc"), "accumulation": 2, "steps": -(-EPOCH // 2)},
        "rows": {**packed, "out": str(folder / "rows")},
        "rows_cut": {**packed, "out": str(folder / "rows_cut"), "stop": CUT},
        "rows_resumed": {**packed, "out": str(folder / "rows_cut"), "resume": True},
    }
    (folder / "plan.json").write_text(json.dumps(plan))
    (folder / "ddp.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(folder / "ddp.py"), str(folder / "plan.json"), str(folder),
                           str(free_port())], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return {name: [rank[name] for rank in ranks] for name in plan}


def store_ids(store: str) -> list[int]:
    """Every seq_id of the store, read directly (the reference)."""
    return [seq_id for seq_id, *_ in iter_sequences(store)]


def flat(batches: list[list[int]]) -> list[int]:
    return [seq_id for batch in batches for seq_id in batch]


def assert_one_epoch(ranks: list[dict], steps: int, store: str) -> None:
    """The first ``steps`` micro-batches of every rank hold every sequence of ``store`` once, each on one rank."""
    per_rank = [Counter(flat(r["seen"][:steps])) for r in ranks]
    assert sum(per_rank, Counter()) == Counter(store_ids(store)), [sorted(c.values()) for c in per_rank]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert [r["world"] for r in ranks] == [[rank, RANKS] for rank in range(RANKS)]


def test_each_rank_trains_on_its_own_slice_of_padded_batches(runs, padded_store):
    ranks = runs["padded"]
    assert [r["global_step"] for r in ranks] == [STEPS] * RANKS
    assert [len(r["seen"]) for r in ranks] == [STEPS] * RANKS and all(len(b) == BATCH for r in ranks for b in r["seen"])
    assert_one_epoch(ranks, EPOCH, padded_store)
    ids = store_ids(padded_store)
    for rank, r in enumerate(ranks):  # in the rank's own order, the epoch's end reported by Accelerate
        ds = CacheDataset(padded_store, shuffle=True, seed=SEED, world=World(rank, RANKS))
        assert flat(r["seen"][:EPOCH]) == [ids[i] for i in ds.indices()]
        assert r["ends"] == [step == EPOCH - 1 for step in range(STEPS)]


def test_each_rank_trains_on_its_own_token_budget_rows(runs, chat_store):
    ranks = runs["rows"]
    rows = len(CacheDataset(chat_store, pack_tokens=BUDGET, world=World(0, RANKS)))
    assert [r["global_step"] for r in ranks] == [rows + 1] * RANKS
    assert_one_epoch(ranks, rows, chat_store)
    assert [r["ends"][rows - 1] for r in ranks] == [True] * RANKS


def test_gradient_accumulation_ends_the_epoch_with_a_partial_group(runs, padded_store):
    """5 micro-batches per rank and accumulation 2: optimizer steps of 2, 2 and 1 micro-batches, one epoch."""
    ranks = runs["accumulated"]
    assert [r["global_step"] for r in ranks] == [-(-EPOCH // 2)] * RANKS
    assert [len(r["seen"]) for r in ranks] == [EPOCH] * RANKS
    assert_one_epoch(ranks, EPOCH, padded_store)
    assert all(r["ends"] == [step == EPOCH - 1 for step in range(EPOCH)] for r in ranks)


@pytest.mark.parametrize("name", ["padded", "rows"])  # padded batches, token-budget rows
def test_a_resumed_ddp_run_trains_on_exactly_the_remaining_batches_of_each_rank(runs, name):
    for whole, cut, resumed in zip(runs[name], runs[f"{name}_cut"], runs[f"{name}_resumed"]):
        assert cut["seen"] == whole["seen"][:CUT]
        assert resumed["global_step"] == whole["global_step"] and resumed["seen"] == whole["seen"][CUT:]
        # by position: the sequences trained on, plus Accelerate's one look-ahead batch
        assert resumed["decoded"] <= len(flat(whole["seen"][CUT:])) + max(map(len, whole["seen"]))


def trainer_over(ds: CacheDataset, teacher: str, out, **over):
    from transformers import TrainingArguments

    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults
    from logitcache.train.loop import make_student

    args = TrainingArguments(**{"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": BATCH,
                                "use_cpu": True, **training_args_defaults(), **over})
    return KDTrainer(model=make_student(f"init:{teacher}:1"), args=args, train_dataset=ds, data_collator=ds.collate)


def test_the_training_loaders_workers_send_batches_by_name(padded_store, tiny_teacher, tmp_path):
    """With DataLoader workers, KDTrainer's loader (through Accelerate's wrapper) keeps the worker_init_fn that has
    them send batches by the file_system strategy, and yields the batches of a loader without workers."""
    from logitcache.train.collate import send_batches_by_name

    def loader(workers: int):
        return trainer_over(CacheDataset(padded_store, shuffle=True, seed=SEED), tiny_teacher, tmp_path,
                            dataloader_num_workers=workers).get_train_dataloader()

    here, there = loader(0), loader(1)
    assert here.worker_init_fn is None and there.worker_init_fn is send_batches_by_name
    assert [b["seq_ids"].tolist() for b in there] == [b["seq_ids"].tolist() for b in here]


def test_a_dataset_of_another_world_or_dispatched_batches_are_refused(padded_store, tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"CacheDataset world: found rank 1 of 2, expected rank 0 of 1"):
        trainer_over(CacheDataset(padded_store, world=World(1, RANKS)), tiny_teacher, tmp_path)
    for name in ("dispatch_batches", "split_batches"):
        with pytest.raises(ConfigError, match=f"accelerator_config {name}: found True, expected unset or False"):
            trainer_over(CacheDataset(padded_store), tiny_teacher, tmp_path, accelerator_config={name: True})


def test_the_training_loader_reads_the_dataset_itself_and_drops_the_last_batch_if_asked(padded_store, tiny_teacher,
                                                                                       tmp_path):
    ds = CacheDataset(padded_store, shuffle=True, seed=SEED)
    loader = trainer_over(ds, tiny_teacher, tmp_path, per_device_train_batch_size=6,
                          dataloader_drop_last=True).get_train_dataloader()
    batches = [batch["seq_ids"].tolist() for batch in loader]
    ids = store_ids(padded_store)
    assert batches == [[ids[i] for i in ds.indices()[j:j + 6]] for j in (0, 6, 12)]  # 20 // 6 full batches
