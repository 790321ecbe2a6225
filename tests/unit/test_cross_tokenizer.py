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


def reference_loss(z: torch.Tensor, batch: dict, alpha: float, w_m: float, w_u: float, tau: float) -> torch.Tensor:
    """The cross-tokenizer loss written out position by position in float64 (docs/cross_tokenizer.md, "Loss")."""
    z = z.double().reshape(-1, z.shape[-1])
    labels, kd = batch["labels"].reshape(-1), batch["kd_mask"].reshape(-1)
    q = dense(batch["target_ids"], batch["target_probs"], batch["target_mask"], z.shape[-1]).reshape(z.shape)
    matched = torch.nn.functional.pad(batch["student_matched"], (0, z.shape[-1] - batch["student_matched"].numel()))
    ce, exact, uld = [], [], []
    for i in range(z.shape[0]):
        if labels[i] != -100:
            ce.append(-torch.log_softmax(z[i], -1)[labels[i]])
        if kd[i]:
            logp = torch.log_softmax(z[i] / tau, -1)
            exact.append((torch.special.xlogy(q[i], q[i]) - q[i] * logp).sum())
            teacher = batch["uld_probs"].reshape(z.shape[0], -1)[i][batch["uld_mask"].reshape(z.shape[0], -1)[i]]
            student = torch.sort(logp.exp()[~matched], descending=True).values[: teacher.numel()]
            uld.append((teacher.double() - student).abs().sum())
    mean = lambda xs: torch.stack(xs).mean() if xs else z.new_zeros(())  # noqa: E731
    return (1 - alpha) * mean(ce) + alpha * (w_m * mean(exact) + w_u * mean(uld))


@pytest.mark.parametrize("alpha,w_m,w_u,tau,chunk", [(0.5, 1.0, 1.0, 1.0, 7), (0.3, 0.5, 2.0, 2.0, 1),
                                                     (1.0, 1.0, 1.0, 1.0, 1000), (0.0, 1.0, 1.0, 1.0, 13)])
def test_chunked_equals_plain_and_reference(tiny_tokenizer, unigram, alpha, w_m, w_u, tau, chunk):
    """Hidden states + head in chunks give the plain loss's value and gradients; both equal a float64 reference
    written out per position. Items of unequal length (padding) with an untrained prompt (masks), merged groups
    and unmatched teacher entries (ULD) included."""
    from logitcache.train.losses_xtok_chunked import ChunkedCrossTokenizerKDLoss, chunked_cross_tokenizer_kd_loss

    items, _ = teacher_items(tiny_tokenizer, "hybrid", masked=True, peaked=True, k=5, n=20)
    batch = CrossTokenizerTransform(tiny_tokenizer, unigram, cache=False).collate(items)
    assert batch["uld_mask"].any() and batch["xtok_stats"].positions["many_to_one"] > 0
    assert batch["xtok_stats"].positions["untrained"] > 0 and (batch["attention_mask"] == 0).any()
    gen = torch.Generator().manual_seed(3)
    b, t = batch["input_ids"].shape
    hidden = torch.randn(b, t, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(len(unigram) + 3, 24, generator=gen, dtype=torch.float64)  # padded vocabulary
    kw = dict(alpha=alpha, matched_weight=w_m, unmatched_weight=w_u, temperature=tau)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = cross_tokenizer_kd_loss(h1 @ w1.T, batch, **kw)
    plain.backward()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    chunked = chunked_cross_tokenizer_kd_loss(h2, w2, batch, chunk_size=chunk, **kw)
    (2.0 * chunked).backward()  # an incoming gradient other than 1 scales the stored ones
    h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = reference_loss(h3 @ w3.T, batch, alpha, w_m, w_u, tau)
    reference.backward()
    assert abs(float(plain) - float(reference)) < 1e-5 and abs(float(chunked) - float(reference)) < 1e-5
    for plain_grad, chunked_grad, ref_grad in ((h1.grad, h2.grad, h3.grad), (w1.grad, w2.grad, w3.grad)):
        assert torch.allclose(plain_grad, ref_grad, atol=1e-5)
        assert torch.allclose(chunked_grad.double(), 2.0 * ref_grad, atol=2e-5)
    module = ChunkedCrossTokenizerKDLoss(chunk_size=chunk, **kw)
    assert abs(float(module(hidden.float(), weight.float(), batch)) - float(reference)) < 1e-5


def test_chunked_refuses_bad_arguments(tiny_tokenizer, unigram):
    from logitcache.errors import ConfigError
    from logitcache.train.losses_xtok_chunked import chunked_cross_tokenizer_kd_loss

    batch = CrossTokenizerTransform(tiny_tokenizer, unigram, cache=False).collate(teacher_items(tiny_tokenizer,
                                                                                              "topk", k=5)[0])
    hidden, weight = torch.zeros(*batch["input_ids"].shape, 8), torch.zeros(len(unigram), 8)
    with pytest.raises(ConfigError, match="chunk_size must be >= 1; found 0"):
        chunked_cross_tokenizer_kd_loss(hidden, weight, batch, chunk_size=0)
    with pytest.raises(ConfigError, match="matched_weight and unmatched_weight must be >= 0"):
        chunked_cross_tokenizer_kd_loss(hidden, weight, batch, unmatched_weight=-1.0)
    with pytest.raises(ConfigError, match="the student's logits have 100 entries; its tokenizer has 1256 ids"):
        chunked_cross_tokenizer_kd_loss(hidden, weight[:100], batch)


def test_vocab_map_cache_damaged_or_unwritable_is_matched_again(tiny_tokenizer, unigram, tmp_path, monkeypatch):
    reference = vocab_map(tiny_tokenizer, unigram, cache=False)
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "home"))
    vocab_map(tiny_tokenizer, unigram)
    (cached,) = (tmp_path / "home" / "vocab_maps").glob("*.npz")
    good = cached.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a zip", None):
        if damaged is None:  # a readable file of the right shapes but ids beyond the student's vocabulary
            np.savez(cached, teacher_to_student=np.full(len(reference.teacher_to_student), 10 ** 6),
                     student_matched=reference.student_matched)
        else:
            cached.write_bytes(damaged)
        again = vocab_map(tiny_tokenizer, unigram)
        assert np.array_equal(again.teacher_to_student, reference.teacher_to_student)
        assert cached.read_bytes() == good  # rewritten whole
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "file" / "home"))  # no cache can be written there
    assert np.array_equal(vocab_map(tiny_tokenizer, unigram).teacher_to_student, reference.teacher_to_student)
