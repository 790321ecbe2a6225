"""Cross-tokenizer targets and loss (logitcache/train/cross_tokenizer.py, losses_xtok.py, vocab_map.py):
the identity case equals the ordinary path, the chain rule on merged groups, the exact part unbiased
over RS-KD seeds, the vocabulary-map cache, the store check, and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_within_multinomial_bound, exact_gradient, tiny_store
from logitcache.errors import StoreError
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.testing.targets import build
from logitcache.train.align import encode_student
from logitcache.train.collate import collate
from logitcache.train.cross_tokenizer import CrossTokenizerTransform
from logitcache.train.losses import kd_loss
from logitcache.train.losses_xtok import cross_tokenizer_kd_loss, cross_tokenizer_terms
from logitcache.train.vocab_map import mass_coverage, vocab_map

TEXTS = ["The list.sort() method sorts   in place; 3.14 ≈ π, naïve café 😀.\n",
         "def f(x):\n    return x ** 2  # 日本語\n\tyield from range(10)"]


@pytest.fixture(scope="module")
def unigram():
    from logitcache.testing.tokenizers import make_unigram_tokenizer

    return make_unigram_tokenizer()


def teacher_items(tokenizer, method: str, seed: int = 0, masked: bool = False, peaked: bool = False, **kw
                  ) -> tuple[list[dict], list]:
    """Items of TEXTS in ``tokenizer``'s tokens with ``method`` targets of a random dense teacher (returned);
    ``peaked``: half of every position's mass on its label (realized tokens are likely, as for a real teacher)."""
    gen = torch.Generator().manual_seed(seed)
    items, dense = [], []
    for i, text in enumerate(TEXTS):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        t = torch.distributions.Dirichlet(torch.full((len(tokenizer),), 0.1)).sample((ids.numel() - 1,))
        if peaked:
            t = 0.5 * t + 0.5 * torch.nn.functional.one_hot(ids[1:], len(tokenizer))
        item = {"seq_id": i, "input_ids": ids[:-1], "labels": ids[1:]}
        if masked:  # a documents row: the first third untrained, compact targets
            mask = torch.arange(ids.numel() - 1) >= (ids.numel() - 1) // 3
            item.update(loss_mask=mask, labels=torch.where(mask, ids[1:], -100))
            t_stored = t[mask]
        else:
            t_stored = t
        items.append({**item, "targets": build(method, t_stored, gen, **kw)})
        dense.append(t)
    return items, dense


def dense(ids: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(*ids.shape[:-1], vocab, dtype=torch.float64).scatter_add_(
        -1, ids, torch.where(mask, probs.double(), 0.0))


@pytest.mark.parametrize("method,masked", [("sample", False), ("hybrid", False), ("topk", True), ("sample", True)])
def test_identity_equals_ordinary_path(tiny_tokenizer, method, masked):
    items, _ = teacher_items(tiny_tokenizer, method, masked=masked, k=5, n=20)
    transform = CrossTokenizerTransform(tiny_tokenizer, tiny_tokenizer, cache=False, pad_id=0)
    assert transform.map.coverage == 1.0
    x, ref = transform.collate(items), collate(items)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(x[key], ref[key]), key
    assert torch.equal(x["kd_mask"], ref["labels"] != -100)
    v = len(tiny_tokenizer)
    assert torch.allclose(dense(x["target_ids"], x["target_probs"], x["target_mask"], v),
                          dense(ref["target_ids"], ref["target_probs"], ref["target_mask"], v), atol=1e-7)
    assert x["uld_probs"].numel() == 0 and x["xtok_stats"].positions["one_to_one"] == int(x["kd_mask"].sum())
    z = torch.randn(*x["input_ids"].shape, v, dtype=torch.float64)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = cross_tokenizer_kd_loss(z1, x, alpha=0.3)
    expected = kd_loss(z2, ref, alpha=0.3, kind="sparse")
    loss.backward(), expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6) and torch.allclose(z1.grad, z2.grad, atol=1e-7)


def test_chain_rule_on_merged_groups(tiny_tokenizer, unigram):
    """Tiny BPE teacher (short tokens) → Unigram student (longer): a student token spanning teacher tokens
    ``v_1..v_r`` gets ``t_p(v_1)·Π_{k≥2} t(v_k|…)``, computed here from the dense teacher; with ``full``
    targets no mass is lost; with RS-KD the merged groups are skipped and counted, never filled in."""
    items, dense_t = teacher_items(tiny_tokenizer, "full", peaked=True)
    transform = CrossTokenizerTransform(tiny_tokenizer, unigram, cache=False)
    for item, t in zip(items, dense_t):
        out = transform(item)
        assert out.stats.positions["many_to_one"] > 0 and out.stats.positions["many_to_one_skipped"] == 0
        tokens = torch.cat([item["input_ids"], item["labels"][-1:]]).numpy()
        kd = out.kd_mask.numpy()
        q_of = np.repeat(np.arange(kd.size), out.exact_lengths)
        total = np.bincount(q_of, weights=out.exact_probs, minlength=kd.size)
        total += np.bincount(np.repeat(np.arange(kd.size), out.uld_lengths), weights=out.uld_probs, minlength=kd.size)
        assert np.allclose(total[kd], 1.0, atol=1e-5)  # full targets: every unit of mass lands somewhere
        ends = np.cumsum(transform.teacher_bytes.lengths(tokens, "t"))
        s_ends = encode_student(unigram, transform.student_bytes, transform.teacher_bytes.join(tokens)).ends
        checked = 0
        for q in np.nonzero(kd)[0]:
            start, stop = s_ends[q], s_ends[q] + len(transform.student_bytes.table[int(out.labels[q])])
            span = np.nonzero((ends > start) & (ends <= stop))[0]  # teacher tokens v_1..v_r of the group
            if span.size < 2:
                continue
            p = span[0] - 1
            expected = float(t[p, tokens[span[0]]]) * float(np.prod([float(t[k - 1, tokens[k]]) for k in span[1:]]))
            ids, probs = out.exact_ids[q_of == q], out.exact_probs[q_of == q]
            for sid, also in ((int(out.labels[q]), expected), (transform.map.teacher_to_student[tokens[span[0]]],
                                                               -expected)):  # v_1's own id keeps t_p(v_1)(1 − Π)
                same = sum(float(t[p, v]) for v in np.nonzero(transform.map.teacher_to_student == sid)[0])
                if sid >= 0:
                    assert abs(probs[ids == sid].sum() - same - also) < 1e-6
            checked += 1
        assert checked == out.stats.positions["many_to_one"]
    skipped = transform(teacher_items(tiny_tokenizer, "sample", n=20)[0][0]).stats.positions
    assert skipped["many_to_one"] == 0 and skipped["many_to_one_skipped"] > 0


def test_exact_part_gradient_unbiased_over_rskd_seeds(tiny_tokenizer, unigram):
    """Mean over 100 RS-KD seeds (N = 20) of the exact-match KL gradient equals the gradient with the dense
    teacher mapped the same way, elementwise within 5 standard errors of the mean (from the multinomial
    variance) plus three draws' worth (ids of probability ~1e-7 drawn once are no normal variable)."""
    transform = CrossTokenizerTransform(tiny_tokenizer, unigram, cache=False)
    _, dense_t = teacher_items(tiny_tokenizer, "sample", seed=1)
    full_items = [{**it, "targets": build("full", t, torch.Generator())} for it, t in
                  zip(teacher_items(tiny_tokenizer, "full", seed=1)[0], dense_t)]
    reference = transform.collate(full_items)
    z = torch.randn(*reference["input_ids"].shape, len(unigram), dtype=torch.float64)

    grads = []
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        items = [{**it, "targets": build("sample", t, gen, n=20)} for it, t in zip(full_items, dense_t)]
        batch = transform.collate(items)
        assert torch.equal(batch["kd_mask"], reference["kd_mask"] & (batch["kd_mask"]))  # merged: skipped
        grads.append(exact_gradient(z, {**batch, "kd_mask": batch["kd_mask"]}))
    kd = transform.collate([{**it, "targets": build("sample", t, torch.Generator(), n=20)}
                            for it, t in zip(full_items, dense_t)])["kd_mask"]
    expected = exact_gradient(z, {**reference, "kd_mask": kd})
    q = torch.where(kd[..., None], dense(reference["target_ids"], reference["target_probs"], reference["target_mask"],
                                         len(unigram)), 0.0)
    assert_within_multinomial_bound(grads, expected, q, z, int(kd.sum()), draws=20)


def test_vocab_map_cached_per_pair(tiny_tokenizer, unigram, tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path))
    first = vocab_map(tiny_tokenizer, unigram)
    files = list((tmp_path / "vocab_maps").glob("*.npz"))
    assert len(files) == 1
    again = vocab_map(tiny_tokenizer, unigram)
    assert np.array_equal(first.teacher_to_student, again.teacher_to_student)
    assert list((tmp_path / "vocab_maps").glob("*.npz")) == files  # read, not rewritten under another name
    vocab_map(unigram, tiny_tokenizer)
    assert len(list((tmp_path / "vocab_maps").glob("*.npz"))) == 2  # the reverse pair is another map
    pairs = [(t, int(u)) for t, u in enumerate(first.teacher_to_student) if u >= 0]
    assert len(pairs) > 200
    for tid, sid in pairs:  # equal bytes, as the tokenizers' own decoders and token strings say
        text = tiny_tokenizer.decode([tid])
        if "\ufffd" not in text:  # a token that is part of a character decodes to a replacement character
            assert text.lstrip(" ") == unigram.decode([sid]).lstrip(" ")
            assert tiny_tokenizer.convert_ids_to_tokens(tid).startswith("Ġ") == \
                unigram.convert_ids_to_tokens(sid).startswith("▁")
    targets = teacher_items(tiny_tokenizer, "topk", k=5)[0][0]["targets"]
    mapped, stored = mass_coverage(targets, first)
    assert 0 < mapped <= stored < 1


def test_store_tokenizer_is_checked(tiny_teacher, tiny_tokenizer, unigram, tmp_path):
    from logitcache.train.dataset import CacheDataset

    path = tiny_store(tiny_teacher, tmp_path / "store", sequences=4, sequences_per_shard=2)
    with pytest.raises(StoreError, match="tokenizer mismatch"):
        CacheDataset(path, tokenizer_fingerprint=tokenizer_fingerprint(unigram))  # the student is refused
    with pytest.raises(StoreError, match="teacher tokenizer given to CrossTokenizerTransform"):
        CrossTokenizerTransform(unigram, tiny_tokenizer, store=path, cache=False)
    CrossTokenizerTransform(tiny_tokenizer, unigram, store=path, cache=False)


def test_student_with_another_tokenizer_trains(tiny_teacher, tiny_tokenizer, unigram, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from logitcache.train.dataset import CacheDataset

    path = tiny_store(tiny_teacher, tmp_path / "store", sequences=16, sequences_per_shard=8)
    ds = CacheDataset(path, tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer))
    transform = CrossTokenizerTransform(tiny_tokenizer, unigram, store=path, cache=False)
    batch = transform.collate(list(ds))
    assert batch["xtok_stats"].positions["one_to_one"] > 0
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(unigram), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    student = LlamaForCausalLM(config)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = cross_tokenizer_kd_loss(logits, batch, alpha=0.5)
        history.append((float(loss.detach()), float(cross_tokenizer_terms(logits.detach(), batch).exact)))
        opt.zero_grad(), loss.backward(), opt.step()
    assert history[-1][0] < 0.7 * history[0][0] and history[-1][1] < history[0][1]
