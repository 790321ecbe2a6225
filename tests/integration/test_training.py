"""Training from a store captured by ``logitcache capture``, with the tiny teacher (fast, CPU only).

The plain loop (loss goes down, outputs, eval metrics, exact resume), the CLI, the HF ``Trainer``
(:class:`KDTrainer`) and a 2-process DDP run on gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import free_port, subprocess_env

import logitcache.train.loop as train_mod
from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.errors import ConfigError
from logitcache.train.loop import TrainConfig, make_student, train

SEQ_LEN = 32
SEQUENCES = 24
BATCH = 4
EPOCH_BATCHES = SEQUENCES // BATCH
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tiny_teacher, tmp_path_factory) -> str:
    """24 RS-KD windows (N=20 draws) captured by the ``logitcache capture`` CLI in a subprocess."""
    out = tmp_path_factory.mktemp("train_store") / "rskd"
    cmd = [sys.executable, "-m", "logitcache.cli", "capture", "--teacher", tiny_teacher, "--dtype", "float32",
           "--seq-len", str(SEQ_LEN), "--max-tokens", str(SEQ_LEN * SEQUENCES), "--method", "sample",
           "--samples", "20", "--out", str(out), "--sequences-per-shard", "8", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    from logitcache.store import inspect_store

    assert inspect_store(out)["sequences"] == SEQUENCES
    return str(out)


@pytest.fixture(scope="module")
def eval_store(tiny_teacher, tmp_path_factory) -> str:
    """6 hybrid windows (exact top-4 head + 20 draws), so top-1 agreement is defined."""
    out = tmp_path_factory.mktemp("eval_store") / "hybrid"
    config = CaptureConfig().with_overrides({
        "teacher.model": tiny_teacher, "teacher.dtype": "float32", "corpus.seq_len": SEQ_LEN,
        "corpus.max_tokens": SEQ_LEN * 6, "store.path": str(out), "sparsify.method": "hybrid",
        "sparsify.k": 4, "sparsify.samples": 20, "seed": 1})
    capture(config, progress=False)
    return str(out)


def make_config(store, tiny_teacher, out, **over) -> TrainConfig:
    base = dict(store=store, student=f"init:{tiny_teacher}:1", out=str(out), batch_size=BATCH, steps=20,
                eval_every=10, lr=3e-3, seed=0)
    return TrainConfig(**{**base, **over})


def recording_train(monkeypatch, config):
    """``train(config)`` plus the seq_ids of every batch it stepped on."""
    seen: list[list[int]] = []
    real_step = train_mod._step

    def step(model, optimizer, batch, cfg):
        seen.append(batch["seq_ids"].tolist())
        return real_step(model, optimizer, batch, cfg)

    monkeypatch.setattr(train_mod, "_step", step)
    result = train(config, progress=False)
    monkeypatch.setattr(train_mod, "_step", real_step)
    return result, seen


@pytest.fixture(scope="module")
def full_run(store, eval_store, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "student"
    with pytest.MonkeyPatch.context() as mp:
        result, seen = recording_train(mp, make_config(store, tiny_teacher, out, eval_store=eval_store))
    return out, result, seen


def test_loss_decreases_and_outputs_are_saved(full_run, tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result, _ = full_run
    losses = result["losses"]
    assert result["step"] == 20 and len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    for name in ("config.json", "model.safetensors", "optimizer.pt", "train_state.json"):
        assert (out / name).is_file(), name
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(tiny_teacher).vocab_size
    assert [e["step"] for e in result["evals"]] == [10, 20]
    for e in result["evals"]:
        assert set(e) == {"step", "ce", "kl", "top1", "tokens"} and e["tokens"] == 6 * SEQ_LEN
        assert np.isfinite(e["ce"]) and e["kl"] >= 0 and 0 <= e["top1"] <= 1
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 20 and state["dataset"]["epoch"] == 20 // EPOCH_BATCHES
    assert state["dataset"]["consumed"] == (20 % EPOCH_BATCHES) * BATCH


def test_make_student_copies_the_first_layers(tiny_teacher):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    student = make_student(f"init:{tiny_teacher}:1", "float32")
    assert len(student.model.layers) == 1 and student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    assert set(s) == {k for k in t if not k.startswith("model.layers.1.")}
    assert all(torch.equal(s[k], t[k]) for k in s)
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        make_student(f"init:{tiny_teacher}:3")


def test_resume_continues_where_it_stopped(full_run, store, eval_store, tiny_teacher, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    ref_out, _, ref_seen = full_run
    out = tmp_path / "student"
    first, seen_a = recording_train(monkeypatch, make_config(store, tiny_teacher, out, steps=10, eval_store=eval_store))
    assert first["step"] == 10 and len(seen_a) == 10
    second, seen_b = recording_train(monkeypatch, make_config(store, tiny_teacher, out, steps=20, eval_store=eval_store))
    assert second["step"] == 20 and len(second["losses"]) == 10 and len(seen_b) == 10
    seen = seen_a + seen_b
    for e in range(0, 20, EPOCH_BATCHES):  # no sequence twice within an epoch, across the restart
        ids = [i for batch in seen[e:e + EPOCH_BATCHES] for i in batch]
        assert len(ids) == len(set(ids))
    assert seen == ref_seen  # the same order as the uninterrupted run
    assert [e["step"] for e in second["evals"]] == [10, 20]
    ref, got = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


def test_resume_refuses_another_store_or_batch_size(full_run, store, tiny_teacher):
    out, _, _ = full_run
    with pytest.raises(ConfigError, match="'batch_size'"):
        train(make_config(store, tiny_teacher, out, batch_size=2), progress=False)


def test_config_round_trip_and_errors(tiny_teacher):
    config = TrainConfig(store="s", student="init:embedded:smollm2-135m-instruct:6", out="o")
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({**config.to_dict(), "kind": "train"}).kind == "auto"
    assert train_mod._split_init_spec(config.student) == ("embedded:smollm2-135m-instruct", 6)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({**config.to_dict(), "batchsize": 4})
    with pytest.raises(ConfigError, match="init:<teacher>:<layers>"):
        TrainConfig(store="s", student="init:embedded:smollm2-135m-instruct", out="o")
    with pytest.raises(ConfigError, match="kind must be one of"):
        TrainConfig(store="s", student="x", out="o", kind="forward")
    with pytest.raises(ConfigError, match="missing"):
        TrainConfig.from_dict({"store": "s"})


def test_job_config_validates():
    data = yaml.safe_load((ROOT / "jobs" / "train-pydoc.yaml").read_text())
    assert data.pop("kind") == "train"
    config = TrainConfig.from_dict(data)
    assert config.student.startswith("init:embedded:smollm2-135m-instruct:")


def test_cli_train_with_yaml_and_flags(store, tiny_teacher, tmp_path):
    from logitcache.cli.train import train_command

    cfg = {"kind": "train", "store": store, "student": f"init:{tiny_teacher}:1", "out": str(tmp_path / "o"),
           "batch_size": 99, "steps": 100}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--config", str(tmp_path / "t.yaml"), "--steps", "2", "--batch-size", str(BATCH), "--quiet"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 2
    assert json.loads((tmp_path / "o" / "train_state.json").read_text())["config"]["batch_size"] == BATCH
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "kind": "capture"}))
    result = CliRunner().invoke(train_command, ["--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code != 0 and "expects kind 'train'" in str(result.exception)


def test_hf_trainer(store, tiny_teacher, tmp_path):
    from transformers import TrainingArguments

    from logitcache import CacheDataset
    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults

    assert training_args_defaults()["remove_unused_columns"] is False
    student = make_student(f"init:{tiny_teacher}:1")
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    ds = CacheDataset(store, shuffle=True, seed=0, batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=5, per_device_train_batch_size=4,
                             remove_unused_columns=False, report_to=[], use_cpu=True, dataloader_num_workers=0,
                             save_strategy="no", logging_steps=1, learning_rate=1e-3)
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, data_collator=ds.collate, kd_alpha=0.5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 5 and len(losses) == 5 and all(np.isfinite(losses))
    changed = [k for k, v in student.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.utils.data import DataLoader

    def worker(rank, store, student, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        from logitcache import CacheDataset, World, kd_loss
        from logitcache.train.world import detect_world
        from logitcache.train.loop import make_student
        world = detect_world()
        assert world == World(rank, 2), world
        ds = CacheDataset(store, shuffle=True, seed=0, batch_size=2)
        model = torch.nn.parallel.DistributedDataParallel(make_student(student))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        seen, steps = [], 0
        for batch in DataLoader(ds, batch_size=2, collate_fn=ds.collate):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = kd_loss(logits, batch, alpha=0.5)
            opt.zero_grad(); loss.backward(); opt.step()
            seen += batch["seq_ids"].tolist(); steps += 1
            if steps == 3:
                break
        torch.save(model.module.state_dict(), os.path.join(out, f"params{rank}.pt"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": world.rank, "world_size": world.world_size, "seq_ids": seen, "steps": steps,
                       "epoch_ids": ds.indices().tolist()}, f)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        store, student, out, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        from logitcache.train.loop import make_student  # imported once, inherited by the forked ranks
        make_student(student)
        mp.start_processes(worker, args=(store, student, out, port), nprocs=2, join=True, start_method="fork")
""")


def test_ddp_two_ranks_read_disjoint_slices(store, tiny_teacher, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), store, f"init:{tiny_teacher}:1", str(tmp_path),
                           str(free_port())], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    a, b = (set(r["seq_ids"]) for r in ranks)
    assert len(a) == len(b) == 6 and not a & b
    assert not set(ranks[0]["epoch_ids"]) & set(ranks[1]["epoch_ids"])  # whole-epoch slices disjoint too
    p0, p1 = (torch.load(tmp_path / f"params{r}.pt", weights_only=True) for r in (0, 1))
    assert set(p0) == set(p1) and all(torch.equal(p0[k], p1[k]) for k in p0)
