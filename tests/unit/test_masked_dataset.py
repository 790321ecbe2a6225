"""A ``documents`` store (masked rows, compact targets) through the train side: dataset items, padded and
padding-free batches, the KD losses over trained positions only, a real student forward, the HF
``Trainer`` and the plain loop, and resume over packed batches.

The store is written with the store API (``encode_unit`` with train masks) from random tokens, random
masks (some positions trained, some not, one row with a single trained position) and random targets at
the trained positions only. Tolerances: logits within 1e-5 (fp32, the same keys in another kernel call);
losses within 1e-5 relative of a float64 reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import write_documents_store
from logitcache.errors import ConfigError
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.testing.store_conformance import VOCAB
from logitcache.testing.targets import assert_equal, build, canonical
from logitcache.train.dataset import CacheDataset, CacheView
from logitcache.train.losses import kd_loss
from logitcache.train.losses_chunked import chunked_kd_loss
from logitcache.train.packing import pack, student_inputs

IGNORE = -100
SEQ_LEN, PER_SHARD = 16, 4
LENGTHS = [17, 5, 12, 2, 9, 17, 3, 14, 7, 11, 16, 6, 4, 13]  # tokens per row (2 <= L <= SEQ_LEN + 1)
BATCH = 3
K, N = 4, 30  # head size, draws per position


def _rows(method: str, seed: int) -> list[tuple[int, np.ndarray, np.ndarray, object]]:
    """``(seq_id, tokens int32[L], mask bool[L-1], compact targets)`` per row; row 4 trains one position."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    rows = []
    for i, length in enumerate(LENGTHS):
        tokens = rng.integers(0, VOCAB, length).astype(np.int32)
        mask = rng.random(length - 1) < 0.6
        mask[rng.integers(0, length - 1)] = True  # at least one trained position
        if i == 4:
            mask[:] = np.arange(length - 1) == 5
        t = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.3)).sample((int(mask.sum()),))
        t = (t + 1e-9) / (t + 1e-9).sum(-1, keepdim=True)
        rows.append((1000 + 7 * i, tokens, mask, build(method, t, gen, k=K, n=N)))
    return rows


def write_store(root: str, method: str, rows: list, fingerprint: str) -> str:
    return write_documents_store(root, method, rows, fingerprint, per_shard=PER_SHARD, k=K, n=N, seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def fingerprint(tiny_tokenizer) -> str:
    return tokenizer_fingerprint(tiny_tokenizer)


@pytest.fixture(scope="module", params=["topk", "sample", "hybrid"])
def masked(request, tmp_path_factory, fingerprint):
    """``(store path, rows written)`` for each method."""
    rows = _rows(request.param, seed=len(request.param))
    root = str(tmp_path_factory.mktemp(f"documents_{request.param}") / "store")
    return write_store(root, request.param, rows, fingerprint), rows


@pytest.fixture(scope="module")
def hybrid_store(tmp_path_factory, fingerprint) -> str:
    return write_store(str(tmp_path_factory.mktemp("documents") / "store"), "hybrid", _rows("hybrid", seed=11),
                       fingerprint)


def _student(tiny_teacher: str) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(tiny_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


# -- items ----------------------------------------------------------------------------------------------


def test_items_carry_the_mask_labels_and_compact_targets(masked):
    store, rows = masked
    view = CacheView(store)
    assert len(view) == len(rows)
    for i, (seq_id, tokens, mask, targets) in enumerate(rows):
        item = view[i]
        assert list(item) == ["seq_id", "input_ids", "labels", "loss_mask", "targets"]
        assert item["seq_id"] == seq_id
        assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
        assert item["input_ids"].tolist() == tokens[:-1].tolist()
        assert item["loss_mask"].dtype == torch.bool and item["loss_mask"].tolist() == mask.tolist()
        assert item["labels"].tolist() == [int(tok) if m else IGNORE for tok, m in zip(tokens[1:], mask)]
        assert item["targets"].num_positions == int(mask.sum())
        assert_equal(item["targets"], canonical(targets))


def test_padded_and_packed_batches_hold_the_same_trained_positions(hybrid_store):
    """Each trained position of the padded batch appears once in the packed row, with the same label and
    targets; nothing else in either batch has a label or a target."""
    view = CacheView(hybrid_store)
    items = [view[i] for i in range(5)]
    padded, packed = view.collate(items), view.collate_packed(items)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    real = padded["attention_mask"].bool()
    for key in ("input_ids", "labels", "target_tail_mass"):
        assert torch.equal(padded[key][real], packed[key][0]), key
    u = padded["target_ids"].shape[-1]
    for key in ("target_ids", "target_probs", "target_mask"):
        assert torch.equal(padded[key][real], packed[key][0, :, :u]), key
    trained = padded["labels"] != IGNORE
    assert int(trained.sum()) == sum(int(it["loss_mask"].sum()) for it in items)
    assert not padded["target_mask"][~trained].any()
    assert not packed["target_mask"][0][packed["labels"][0] == IGNORE].any()
    assert padded["target_mask"][trained].any(-1).all()


# -- the losses average over trained positions only -------------------------------------------------------


def _by_hand(logits: torch.Tensor, items: list[dict], alpha: float, kind: str) -> torch.Tensor:
    """``(1−α)·CE + α·KD`` over the trained positions alone, from each item's own compact targets and a full
    float64 log-softmax: forward KL ``Σ t̂ (log t̂ − log p)`` (``sparse``), or the head plus the exact tail
    bucket ``m log(m / (1 − Σ_K p))`` (``ghost``)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row, item in enumerate(items):
        tg = item["targets"]
        offsets, ids, probs = tg.estimate()
        for j, pos in enumerate(item["loss_mask"].nonzero()[:, 0].tolist()):
            logp = torch.log_softmax(logits[row, pos].double(), -1)
            if kind == "ghost":
                head, t = tg.head_ids[j].long(), tg.head_logprobs[j].double().exp()
                m = tg.tail_mass[j].double()
                kd = (t * (t.log() - logp[head])).sum() + torch.special.xlogy(m, m) - m * torch.log1p(
                    -logp[head].exp().sum())
            else:
                lo, hi = int(offsets[j]), int(offsets[j + 1])
                t = probs[lo:hi].double()
                kd = (torch.special.xlogy(t, t) - t * logp[ids[lo:hi]]).sum()
            total += (1 - alpha) * -logp[item["labels"][pos]] + alpha * kd
            count += 1
    return total / count


def test_masked_batch_loss_is_the_loss_over_trained_positions_alone(masked):
    store, _ = masked
    view = CacheView(store)
    items = [view[i] for i in range(len(view))]
    batch = view.collate(items)
    gen = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(*batch["input_ids"].shape, 300, generator=gen)).requires_grad_(True)
    kinds = ["sparse", "ghost"] if batch["target_method"] != "sample" else ["sparse"]
    for kind in kinds:
        got = kd_loss(logits, batch, alpha=0.3, kind=kind)
        torch.testing.assert_close(got.double(), _by_hand(logits.detach(), items, 0.3, kind), rtol=1e-5, atol=1e-6)
    # untrained positions (masked out, padding) get no gradient at all
    (grad,) = torch.autograd.grad(kd_loss(logits, batch, alpha=0.3), logits)
    trained = batch["labels"] != IGNORE
    assert (grad[~trained] == 0).all() and (grad[trained].abs().sum(-1) > 0).all()
    # the chunked loss from hidden states and a head computes the same
    hidden = torch.randn(*batch["input_ids"].shape, 8, generator=gen)
    weight = torch.randn(300, 8, generator=gen)
    want = _by_hand(hidden @ weight.T, items, 0.5, "sparse")
    got = chunked_kd_loss(hidden, weight, batch, alpha=0.5, kind="sparse", chunk_size=7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# -- a real student on both kinds of batch ---------------------------------------------------------------


def test_student_forward_on_either_batch_equals_per_sequence_forwards(hybrid_store, tiny_teacher):
    student = _student(tiny_teacher)
    view = CacheView(hybrid_store)
    items = [view[i] for i in range(6)]
    padded, packed = view.collate(items), view.collate_packed(items)
    with torch.no_grad():
        alone = [student(input_ids=it["input_ids"][None], use_cache=False).logits[0] for it in items]
        from_padded = student(**student_inputs(padded)).logits
        from_packed = student(**student_inputs(packed)).logits[0]
    torch.testing.assert_close(from_packed, torch.cat(alone), rtol=0, atol=1e-5)
    torch.testing.assert_close(from_padded[padded["attention_mask"].bool()], torch.cat(alone), rtol=0, atol=1e-5)
    assert set(student_inputs(packed)) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                           "max_length_q", "max_length_k", "use_cache"}


# -- trainers -------------------------------------------------------------------------------------------


def _parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_hf_trainer_trains_from_a_documents_store(hybrid_store, tiny_teacher, tmp_path, padding_free):
    from transformers import TrainingArguments

    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults

    student = _student(tiny_teacher).train()
    before = _parameters(student)
    ds = CacheDataset(hybrid_store, shuffle=True, seed=2, batch_size=BATCH)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=BATCH,
                             learning_rate=1e-3, use_cpu=True, disable_tqdm=True, logging_steps=1, save_strategy="no",
                             seed=0, **training_args_defaults())
    shapes = []

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            shapes.append(tuple(inputs["input_ids"].shape))
            return super().compute_loss(model, inputs, *a, **kw)

    forwarded = []  # the keyword arguments each forward of the student received
    student.register_forward_pre_hook(lambda _, args, kwargs: forwarded.append(set(kwargs)), with_kwargs=True)
    trainer = Recording(model=student, args=args, train_dataset=ds, kd_alpha=0.5,
                        data_collator=ds.collate_packed if padding_free else ds.collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert len(shapes) == 3 and all((s[0] == 1) == padding_free for s in shapes)
    want = {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
            "use_cache"} if padding_free else {"input_ids", "attention_mask"}
    assert forwarded == [want] * 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_plain_loop_trains_padded_and_padding_free_alike(hybrid_store, tiny_teacher, tmp_path, monkeypatch):
    from logitcache.train.loop import TrainConfig, train

    packed_rows = []  # the packed batches the loop's loader made
    monkeypatch.setattr(CacheDataset, "collate_packed",
                        staticmethod(lambda items: packed_rows.append(len(items)) or pack(items)))
    results = {}
    for padding_free in (False, True):
        config = TrainConfig(store=hybrid_store, student=tiny_teacher, out=str(tmp_path / str(padding_free)),
                             batch_size=BATCH, steps=3, eval_every=0, lr=1e-3, padding_free=padding_free)
        results[padding_free] = train(config, progress=False)
        assert len(packed_rows) == (3 if padding_free else 0)
        assert results[padding_free]["step"] == 3 and all(np.isfinite(results[padding_free]["losses"]))
        saved = json.loads((tmp_path / str(padding_free) / "train_state.json").read_text())
        assert saved["config"]["padding_free"] is padding_free
    # the same sequences in each step, the same weights at the first: the same first loss
    assert results[True]["losses"][0] == pytest.approx(results[False]["losses"][0], rel=1e-5)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "True")
    original = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), original.state_dict().values()))


def test_the_loop_and_the_cli_train_with_the_compiled_loss(hybrid_store, tiny_teacher, tmp_path, monkeypatch):
    """loss_impl="compiled" reaches kd_loss (every call counted) and gives the plain loop's losses; the CLI flag
    sets it; a bad value is refused."""
    from logitcache.cli import main
    from logitcache.train import losses
    from logitcache.train.loop import TrainConfig, train

    impls = []
    real = losses.kd_loss
    monkeypatch.setattr(losses, "kd_loss", lambda *a, **kw: impls.append(kw.get("impl")) or real(*a, **kw))
    runs = {impl: train(TrainConfig(store=hybrid_store, student=tiny_teacher, out=str(tmp_path / impl),
                                    batch_size=BATCH, steps=2, eval_every=0, lr=1e-3, loss_impl=impl), progress=False)
            for impl in ("plain", "compiled")}
    assert impls == ["plain"] * 2 + ["compiled"] * 2
    assert runs["compiled"]["losses"] == pytest.approx(runs["plain"]["losses"], rel=1e-4)
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["train", "--store", hybrid_store, "--student", tiny_teacher, "--out", str(out),
                                       "--steps", "1", "--batch-size", str(BATCH), "--eval-every", "0",
                                       "--loss-impl", "compiled", "--quiet"])
    assert result.exit_code == 0, result.output
    assert impls[4:] == ["compiled"]
    assert json.loads((out / "train_state.json").read_text())["config"]["loss_impl"] == "compiled"
    with pytest.raises(ConfigError, match="loss_impl must be one of plain, compiled; found 'fused'"):
        TrainConfig(store=hybrid_store, student=tiny_teacher, out=str(tmp_path / "x"), loss_impl="fused")


def test_cli_train_takes_padding_free(hybrid_store, tiny_teacher, tmp_path):
    from logitcache.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--store", hybrid_store, "--student", tiny_teacher, "--out", str(out),
                                       "--steps", "1", "--batch-size", str(BATCH), "--padding-free", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_state.json").read_text())["config"]["padding_free"] is True
    assert np.isfinite(json.loads(result.stdout.strip().splitlines()[-1])["final_loss"])


# -- resume over packed batches --------------------------------------------------------------------------

PACKED_KEYS = ("seq_ids", "input_ids", "labels", "position_ids", "cu_seq_lens_q", "target_ids", "target_probs",
               "target_mask", "target_tail_mass")


def _packed_batches(ds: CacheDataset, num_workers: int = 0) -> list[dict]:
    loader = DataLoader(ds, batch_size=BATCH, num_workers=num_workers, collate_fn=ds.collate_packed)
    return [{key: batch[key] for key in PACKED_KEYS} for batch in loader]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_over_packed_batches_continues_batch_for_batch(hybrid_store, k, num_workers):
    def dataset() -> CacheDataset:
        return CacheDataset(hybrid_store, shuffle=True, seed=5, epoch=1, batch_size=BATCH)

    whole = _packed_batches(dataset())
    assert len(whole) == -(-len(LENGTHS) // BATCH)
    assert sorted(s for b in whole for s in b["seq_ids"].tolist()) == sorted(1000 + 7 * i for i in range(len(LENGTHS)))
    first = dataset()
    loader = iter(DataLoader(first, batch_size=BATCH, num_workers=num_workers, collate_fn=first.collate_packed))
    for _ in range(k):
        next(loader)
    state = first.state_dict(batches_consumed=k)
    assert state["consumed"] == k * BATCH  # the position counts sequences, packed or not
    resumed = dataset()
    resumed.load_state_dict(state)
    rest = _packed_batches(resumed, num_workers)
    assert [b["seq_ids"].tolist() for b in rest] == [b["seq_ids"].tolist() for b in whole[k:]]
    for got, want in zip(rest, whole[k:]):
        for key in PACKED_KEYS:
            assert torch.equal(got[key], want[key]), key
