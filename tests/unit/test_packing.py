"""Padding-free packing: bins against independent references, the batch against transformers'
``DataCollatorWithFlattening``, a real student forward on a packed row against per-sequence forwards
(sdpa and eager on the CPU), and ``kd_loss`` on a packed batch against a dense per-position reference.

Tolerances: logits of the packed forward within 1e-5 of the per-sequence forward (fp32; the attention
sums run over the same keys in a different kernel call); losses within 1e-5 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening

from logitcache.errors import ConfigError, TargetsError
from logitcache.targets import SparseTargets
from logitcache.testing.targets import build
from logitcache.train.collate import collate
from logitcache.train.losses import kd_loss
from logitcache.train.losses_chunked import chunked_kd_loss
from logitcache.train.packing import PACKED_MODEL_KEYS, model_inputs, pack, plan_bins

IGNORE = -100
LENGTHS = [9, 1, 23, 4, 17, 2, 30, 6]  # tokens per sequence (input positions), a length-1 one included
BUDGET = 40
METHODS = ["topk", "sample", "hybrid", "full"]


# -- bins ---------------------------------------------------------------------------------------------


def _best_fit_reference(lengths: list[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing by a linear scan over every bin (no ordered structure)."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = [b for b in range(len(bins)) if used[b] + lengths[i] <= budget]
        if fits:
            b = min(fits, key=lambda c: (budget - used[c], c))
        else:
            bins.append([])
            used.append(0)
            b = len(bins) - 1
        bins[b].append(i)
        used[b] += lengths[i]
    return [sorted(b) for b in bins]


def _fewest_bins(lengths: list[int], budget: int) -> int:
    """The optimum number of bins, by trying every assignment (small cases only)."""
    for count in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(count), repeat=len(lengths)):
            loads = [0] * count
            for n, b in zip(lengths, assignment):
                loads[b] += n
            if max(loads) <= budget:
                return count
    raise AssertionError("unreachable: one bin per sequence always fits")


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30).flatmap(lambda budget: st.tuples(
    st.just(budget), st.lists(st.integers(1, budget), min_size=0, max_size=40))))
def test_bins_hold_every_sequence_once_within_budget_as_best_fit(case):
    budget, lengths = case
    bins = plan_bins(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert all(b == sorted(b) and b for b in bins)
    assert bins == plan_bins(list(lengths), budget)  # a pure function of the lengths
    assert bins == _best_fit_reference(lengths, budget)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12).flatmap(lambda budget: st.tuples(
    st.just(budget), st.lists(st.integers(1, budget), min_size=1, max_size=6))))
def test_bins_are_within_the_best_fit_decreasing_bound_of_the_optimum(case):
    budget, lengths = case
    # Dósa (2007): FFD and BFD use at most 11/9·OPT + 6/9 bins
    assert 9 * len(plan_bins(lengths, budget)) <= 11 * _fewest_bins(lengths, budget) + 6


def test_bins_worked_by_hand():
    # 5 → new bin A (3 left); 4 → new bin B (4 left); 3 → A (exactly fits: the least room); 3 → B (1 left);
    # 1 → B (full)
    assert plan_bins([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]
    # best fit, not first fit: 8 → A (2 left), 6 → B (4 left), 3 → B (1 left), then 1 fits both and goes to
    # B, the least room; first fit would put it in A, giving [[0, 3], [1, 2]]
    assert plan_bins([8, 6, 3, 1], 10) == [[0], [1, 2, 3]]
    # ties in length go by index; ties in room go to the bin opened first
    assert plan_bins([2, 3, 3, 2], 6) == [[1, 2], [0, 3]]
    assert plan_bins([4, 4, 2], 6) == [[0, 2], [1]]
    assert plan_bins([], 8) == []


def test_bins_refuse_what_cannot_be_packed():
    with pytest.raises(ConfigError, match=r"sequence 2 has 9 tokens, more than max_tokens=8.*at least 9"):
        plan_bins([3, 8, 9], 8)
    with pytest.raises(ConfigError, match="sequence 1 has 0 tokens; expected at least 1"):
        plan_bins([3, 0], 8)
    with pytest.raises(ConfigError, match="max_tokens must be an int >= 1"):
        plan_bins([3], 0)


# -- examples from a real tokenizer and a real teacher --------------------------------------------------


def _token_rows(tokenizer, lengths: list[int]) -> list[torch.Tensor]:
    """Consecutive slices of tokenized pydoc text, ``n + 1`` tokens each (inputs and next tokens)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics)[:20])
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    starts = torch.cumsum(torch.tensor([0, *[n + 1 for n in lengths]]), 0)
    assert int(starts[-1]) <= ids.numel()
    return [ids[int(s) : int(s) + n + 1] for s, n in zip(starts, lengths)]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, attn_implementation="sdpa").eval()


def _student(tiny_teacher: str, attn: str) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(tiny_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _examples(tokenizer, teacher, method: str, lengths=LENGTHS, *, masked: bool = False) -> list[dict]:
    """Dataset items (``input_ids = tokens[:-1]``, ``labels = tokens[1:]``) with the teacher's own targets;
    ``masked``: a loss mask per example (one all-zero, one all-one, the rest random)."""
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i, tokens in enumerate(_token_rows(tokenizer, lengths)):
        with torch.no_grad():
            t = torch.softmax(teacher(input_ids=tokens[None, :-1], use_cache=False).logits[0].double(), -1).float()
        example = {"seq_id": 500 + i, "input_ids": tokens[:-1], "labels": tokens[1:],
                   "targets": build(method, t, gen, k=5, n=30)}
        if masked:
            mask = torch.rand(len(tokens) - 1, generator=gen) < 0.6
            example["loss_mask"] = mask if i not in (0, 2) else torch.full_like(mask, i == 2)
        examples.append(example)
    return examples


def _entries(batch: dict, pos: int) -> list[tuple[int, float]]:
    m = batch["target_mask"][0, pos]
    return sorted(zip(batch["target_ids"][0, pos][m].tolist(), batch["target_probs"][0, pos][m].tolist()))


# -- the packed batch -----------------------------------------------------------------------------------


def test_packed_layout_equals_data_collator_with_flattening(tiny_tokenizer, teacher):
    examples = _examples(tiny_tokenizer, teacher, "sample", masked=True)
    batch = pack(examples, ignore_index=IGNORE)
    # Hugging Face's labels are unshifted (the model shifts): position t's mask governs label t + 1
    features = []
    for e in examples:
        hf_labels = e["input_ids"].clone()
        hf_labels[1:][~e["loss_mask"][:-1]] = IGNORE
        features.append({"input_ids": e["input_ids"], "labels": hf_labels})
    hf = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    for key in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == hf[key].dtype and torch.equal(batch[key], hf[key]), key
    assert batch["max_length_q"] == batch["max_length_k"] == hf["max_length_q"] == max(LENGTHS)
    assert set(hf) - set(batch) == set() and "attention_mask" not in batch
    # shifted as transformers' causal-LM loss shifts them (pad with -100, drop the first)
    hf_shifted = torch.cat([hf["labels"][0, 1:], torch.tensor([IGNORE])])
    last = batch["cu_seq_lens_q"][1:].long() - 1
    not_last = torch.ones(batch["labels"].shape[1], dtype=torch.bool)
    not_last[last] = False
    assert torch.equal(batch["labels"][0, not_last], hf_shifted[not_last])
    # at each sequence's last position HF cannot know the next token; the store does
    assert (hf_shifted[last] == IGNORE).all()
    want_last = torch.stack([torch.where(e["loss_mask"][-1], e["labels"][-1], IGNORE) for e in examples])
    assert torch.equal(batch["labels"][0, last], want_last)
    assert batch["seq_ids"].tolist() == [e["seq_id"] for e in examples]


@pytest.mark.parametrize("method", METHODS)
def test_packed_targets_are_each_sequences_targets(tiny_tokenizer, teacher, method):
    examples = _examples(tiny_tokenizer, teacher, method, masked=True)
    batch = pack(examples)
    start = 0
    for e in examples:
        alone = collate([e])
        for pos in range(len(e["input_ids"])):
            m = alone["target_mask"][0, pos]
            want = sorted(zip(alone["target_ids"][0, pos][m].tolist(), alone["target_probs"][0, pos][m].tolist()))
            assert _entries(batch, start + pos) == want
            assert batch["target_tail_mass"][0, start + pos] == alone["target_tail_mass"][0, pos]
            label = e["labels"][pos] if e["loss_mask"][pos] else IGNORE
            assert batch["labels"][0, start + pos] == label
        start += len(e["input_ids"])
    for key in ("target_head_size", "target_method", "target_num_samples"):
        assert batch[key] == alone[key]


def _trained_only(example: dict) -> dict:
    """The example as a store keeping targets at trained positions only would yield it."""
    keep = example["loss_mask"].nonzero()[:, 0]
    tg, rows = example["targets"], {}
    for name in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths"):
        value = getattr(tg, name)
        rows[name] = None if value is None else value[keep]
    if tg.has_samples:
        offsets = tg.sample_offsets()
        flat = torch.cat([torch.arange(int(offsets[p]), int(offsets[p + 1])) for p in keep.tolist()]
                         or [torch.zeros(0, dtype=torch.int64)])
        rows.update(sample_ids=tg.sample_ids[flat], sample_counts=tg.sample_counts[flat],
                    sample_weights=None if tg.sample_weights is None else tg.sample_weights[flat])
    return {**example, "targets": SparseTargets(method=tg.method, num_samples=tg.num_samples, **rows)}


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_targets_stored_at_trained_positions_only_pack_the_same(tiny_tokenizer, teacher, method):
    examples = _examples(tiny_tokenizer, teacher, method, masked=True)
    full, sparse = pack(examples), pack([_trained_only(e) for e in examples])
    trained = full["labels"][0] != IGNORE
    assert torch.equal(full["labels"], sparse["labels"])
    for pos in range(trained.numel()):
        assert _entries(sparse, pos) == (_entries(full, pos) if trained[pos] else [])
    assert torch.equal(sparse["target_tail_mass"][0, trained], full["target_tail_mass"][0, trained])
    assert (sparse["target_tail_mass"][0, ~trained] == 0).all()


def test_pack_refuses_malformed_examples(tiny_tokenizer, teacher):
    examples = _examples(tiny_tokenizer, teacher, "topk", lengths=[4, 3], masked=True)
    other = _examples(tiny_tokenizer, teacher, "sample", lengths=[4, 3])
    with pytest.raises(TargetsError, match=r"example 1 \(seq_id 501\) has targets \(method, k, N\) = \('sample'"):
        pack([examples[0], other[1]])
    with pytest.raises(TargetsError, match=r"example 1 \(seq_id 501\): loss_mask has shape \(2,\)"):
        pack([examples[0], {**examples[1], "loss_mask": torch.ones(2)}])
    with pytest.raises(TargetsError, match=r"loss_mask has shape \(3,\) and values \[0, 2\]"):
        pack([{**examples[1], "loss_mask": torch.tensor([0, 2, 0])}])
    with pytest.raises(TargetsError, match=r"example 0 \(seq_id 500\): targets cover 3 positions; expected 4"):
        pack([{**examples[0], "targets": examples[1]["targets"]}])
    with pytest.raises(TargetsError, match=r"labels \(3,\); expected both 1-D of the same length"):
        pack([{**examples[0], "labels": examples[1]["labels"]}])
    with pytest.raises(TargetsError, match="at least one example"):
        pack([])


# -- a real student forward -----------------------------------------------------------------------------


def _packed_and_alone(student, examples: list[dict], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        packed = student(**model_inputs(batch)).logits[0]
        alone = torch.cat([student(input_ids=e["input_ids"][None], use_cache=False).logits[0] for e in examples])
    return packed, alone


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_student_forward_on_a_packed_row_equals_per_sequence_forwards(tiny_teacher, tiny_tokenizer, teacher, attn):
    student = _student(tiny_teacher, attn)
    examples = _examples(tiny_tokenizer, teacher, "topk")
    for bin_ in plan_bins([len(e["input_ids"]) for e in examples], BUDGET):
        members = [examples[i] for i in bin_]
        packed, alone = _packed_and_alone(student, members, pack(members))
        torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert len(plan_bins([len(e["input_ids"]) for e in examples], BUDGET)) < len(examples)  # rows held several


def test_broken_layouts_attend_across_sequences(tiny_teacher, tiny_tokenizer, teacher):
    """What the equality above guards against: each way to lose the boundaries changes the logits."""
    student = _student(tiny_teacher, "sdpa")
    examples = _examples(tiny_tokenizer, teacher, "topk", lengths=[9, 1, 23])
    batch = pack(examples)
    _, alone = _packed_and_alone(student, examples, batch)
    broken = {
        "positions not restarted": {**model_inputs(batch), "position_ids": torch.arange(33)[None]},
        "an all-ones attention_mask": {**model_inputs(batch), "attention_mask": torch.ones_like(batch["input_ids"])},
        "the cache left on": {**model_inputs(batch), "use_cache": True},
    }
    first = len(examples[0]["input_ids"])
    for name, inputs in broken.items():
        with torch.no_grad():
            logits = student(**inputs).logits[0]
        torch.testing.assert_close(logits[:first], alone[:first], rtol=0, atol=1e-5)  # the first sequence is fine
        assert (logits[first:] - alone[first:]).abs().max() > 1e-3, name


# -- the loss on a packed batch -------------------------------------------------------------------------


def _dense_reference(logits: list[torch.Tensor], examples: list[dict], alpha: float) -> torch.Tensor:
    """``(1−α)·CE + α·Σ t̂ (log t̂ − log p)`` per trained position from full log-softmaxes, mean over all."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for z, e in zip(logits, examples):
        logp = torch.log_softmax(z.double(), -1)
        offsets, ids, probs = e["targets"].estimate()
        for pos in e["loss_mask"].nonzero()[:, 0].tolist():
            lo, hi = int(offsets[pos]), int(offsets[pos + 1])
            t = probs[lo:hi].double()
            kd = (torch.special.xlogy(t, t) - t * logp[pos, ids[lo:hi]]).sum()
            total += (1 - alpha) * -logp[pos, e["labels"][pos]] + alpha * kd
            count += 1
    return total / count


@pytest.mark.parametrize("method", METHODS)
def test_kd_loss_on_a_packed_batch_averages_over_trained_positions(tiny_teacher, tiny_tokenizer, teacher, method):
    student = _student(tiny_teacher, "sdpa")
    examples = _examples(tiny_tokenizer, teacher, method, masked=True)
    batch = pack(examples)
    with torch.no_grad():
        packed = student(**model_inputs(batch)).logits
        alone = [student(input_ids=e["input_ids"][None], use_cache=False).logits for e in examples]
    reference = _dense_reference([z[0] for z in alone], examples, alpha=0.5)
    got = kd_loss(packed, batch, alpha=0.5, kind="sparse")
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
    # any kind: the packed loss is the per-sequence losses weighted by their trained positions
    weights = [int(e["loss_mask"].sum()) for e in examples]
    per_sequence = [kd_loss(z, collate([{**e, "labels": torch.where(e["loss_mask"], e["labels"], IGNORE)}]))
                    for z, e in zip(alone, examples)]
    weighted = sum(w * loss for w, loss in zip(weights, per_sequence)) / sum(weights)
    torch.testing.assert_close(kd_loss(packed, batch), weighted, rtol=1e-5, atol=1e-6)


def test_chunked_loss_on_a_packed_batch_equals_the_reference(tiny_teacher, tiny_tokenizer, teacher):
    student = _student(tiny_teacher, "sdpa")
    examples = _examples(tiny_tokenizer, teacher, "hybrid", masked=True)
    batch = pack(examples)
    with torch.no_grad():
        hidden = student.model(**model_inputs(batch)).last_hidden_state
        alone = [student(input_ids=e["input_ids"][None], use_cache=False).logits[0] for e in examples]
    got = chunked_kd_loss(hidden, student.lm_head.weight, batch, alpha=0.5, kind="sparse", chunk_size=16)
    torch.testing.assert_close(got.double(), _dense_reference(alone, examples, alpha=0.5), rtol=1e-5, atol=1e-6)


def test_model_inputs_are_the_flattening_keys_without_mask_or_cache(tiny_tokenizer, teacher):
    batch = pack(_examples(tiny_tokenizer, teacher, "topk", lengths=[3, 2]))
    inputs = model_inputs(batch)
    assert set(inputs) == {*PACKED_MODEL_KEYS, "use_cache"} and inputs["use_cache"] is False
    assert "attention_mask" not in inputs and "labels" not in inputs
