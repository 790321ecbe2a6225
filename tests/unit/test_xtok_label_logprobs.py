"""Cross-tokenizer merges from a store's realized-token log-probabilities (``--label-logprobs``): many teacher
: one student groups get the chain-rule target for every method, RS-KD included, equal to the dense
teacher's; no group is skipped; over RS-KD seeds the exact part, merged positions included, is unbiased."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import assert_within_multinomial_bound, exact_gradient, make_config
from logitcache.capture import capture
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.testing.targets import build
from logitcache.train.align import encode_student
from logitcache.train.cross_tokenizer import CrossTokenizerTransform
from logitcache.train.dataset import CacheView


@pytest.fixture(scope="module")
def unigram():
    from logitcache.testing.tokenizers import make_unigram_tokenizer

    return make_unigram_tokenizer()


@pytest.fixture(scope="module")
def stores(tiny_teacher, tmp_path_factory):
    """Two RS-KD (N = 20) captures of the same windows, with and without the column."""
    root = tmp_path_factory.mktemp("xtok_labels")
    over = {"corpus.seq_len": 48, "corpus.max_tokens": 48 * 6}
    for name, on in (("with", True), ("without", False)):
        capture(make_config(tiny_teacher, root / name, "sample", **over, **{"store.label_logprobs": on}),
                progress=False)
    return root / "with", root / "without"


def merged_groups(transform, tokens: np.ndarray, out) -> list[tuple[int, np.ndarray]]:
    """``(student position q, teacher token indices v_1..v_r)`` of every KD position whose next student token
    spans several teacher tokens, found from the byte spans."""
    ends = np.cumsum(transform.teacher_bytes.lengths(tokens, "t"))
    s_ends = encode_student(transform.student_tokenizer, transform.student_bytes, transform.teacher_bytes.join(tokens)).ends
    found = []
    for q in np.nonzero(out.kd_mask.numpy())[0]:
        start, stop = s_ends[q], s_ends[q] + len(transform.student_bytes.table[int(out.labels[q])])
        span = np.nonzero((ends > start) & (ends <= stop))[0]
        if span.size > 1:
            found.append((int(q), span))
    return found


def stored_estimate(targets, p: int) -> dict[int, float]:
    offsets, ids, probs = (x.numpy() for x in targets.estimate())
    return dict(zip(ids[offsets[p]:offsets[p + 1]].tolist(), probs[offsets[p]:offsets[p + 1]].astype(float).tolist()))


def test_rskd_store_merges_by_the_chain_rule_like_the_dense_teacher(tiny_teacher, tiny_tokenizer, unigram, stores):
    """At a merged position the student token gets ``t_p(v_1)·Π_{k≥2} t(v_k|…)`` of the dense forward (plus the
    stored estimate of any other teacher id with its bytes) and ``v_1``'s student id ``t_p(v_1)(1 − Π)``; the
    same store without the column skips every one of them."""
    with_column, without = stores
    fingerprint = tokenizer_fingerprint(tiny_tokenizer)
    transform = CrossTokenizerTransform(tiny_tokenizer, unigram, store=str(with_column), cache=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    to_student = transform.map.teacher_to_student
    checked = 0
    for item in CacheView(str(with_column), tokenizer_fingerprint=fingerprint):
        out = transform(item)
        assert out.stats.positions["many_to_one_skipped"] == 0
        tokens = torch.cat([item["input_ids"], item["labels"][-1:]]).numpy()
        with torch.no_grad():
            lp = torch.log_softmax(model(item["input_ids"][None]).logits[0].double(), -1).numpy()
        q_of = np.repeat(np.arange(out.kd_mask.numel()), out.exact_lengths)
        for q, span in merged_groups(transform, tokens, out):
            p = span[0] - 1
            chain = float(np.exp(sum(lp[k - 1, tokens[k]] for k in span[1:])))
            first = float(np.exp(lp[p, tokens[span[0]]]))
            estimate = stored_estimate(item["targets"], p)
            ids, probs = out.exact_ids[q_of == q], out.exact_probs[q_of == q]
            for sid, value in ((int(out.labels[q]), first * chain), (int(to_student[tokens[span[0]]]),
                                                                     first * (1 - chain))):
                others = sum(e for v, e in estimate.items() if to_student[v] == sid and v != tokens[span[0]])
                if sid >= 0:
                    assert abs(probs[ids == sid].sum() - others - value) < 2e-6 * max(1.0, value / 1e-3)
            checked += 1
    assert checked > 10
    plain = CrossTokenizerTransform(tiny_tokenizer, unigram, store=str(without), cache=False)
    counts = [plain(item).stats.positions for item in CacheView(str(without), tokenizer_fingerprint=fingerprint)]
    assert sum(c["many_to_one"] for c in counts) == 0 and sum(c["many_to_one_skipped"] for c in counts) == checked


TEXTS = ["The list.sort() method sorts   in place; 3.14 ≈ π, naïve café 😀.\n",
         "def f(x):\n    return x ** 2  # 日本語\n\tyield from range(10)"]


def synthetic(tokenizer, seed: int = 1) -> list[tuple[dict, torch.Tensor]]:
    """Items of TEXTS with a random dense teacher peaked on the realized tokens, and that teacher."""
    out = []
    for i, text in enumerate(TEXTS):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        with torch.random.fork_rng(devices=[]):  # Dirichlet draws from the global generator: seed it here
            torch.manual_seed(seed + i)
            t = torch.distributions.Dirichlet(torch.full((len(tokenizer),), 0.1)).sample((ids.numel() - 1,))
        t = 0.5 * t + 0.5 * torch.nn.functional.one_hot(ids[1:], len(tokenizer))
        out.append(({"seq_id": i, "input_ids": ids[:-1], "labels": ids[1:]}, t.double()))
    return out


def labelled(item: dict, t: torch.Tensor, method: str, gen: torch.Generator) -> dict:
    targets = build(method, t, gen, n=20)
    realized = t.gather(1, item["labels"][:, None])[:, 0].log().float()
    return {**item, "targets": dataclasses.replace(targets, label_logprobs=realized)}


def test_merged_positions_are_unbiased_over_rskd_seeds(tiny_tokenizer, unigram):
    """Mean over 100 RS-KD seeds (N = 20) of the exact-part gradient, merged positions now included, equals the
    gradient of the same transform on ``full`` targets, elementwise within 5 standard errors of the mean (the
    multinomial bound of test_cross_tokenizer.py; the exact merged entries only lower the variance) plus three
    draws' worth (rare ids drawn once are no normal variable)."""
    transform = CrossTokenizerTransform(tiny_tokenizer, unigram, cache=False)
    pairs = synthetic(tiny_tokenizer)
    reference = transform.collate([labelled(item, t, "full", torch.Generator()) for item, t in pairs])
    assert reference["xtok_stats"].positions["many_to_one"] > 5
    z = torch.randn(*reference["input_ids"].shape, len(unigram), dtype=torch.float64)

    grads = []
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        batch = transform.collate([labelled(item, t, "sample", gen) for item, t in pairs])
        assert torch.equal(batch["kd_mask"], reference["kd_mask"]) and batch["xtok_stats"].positions[
            "many_to_one_skipped"] == 0
        grads.append(exact_gradient(z, batch))
    q = torch.zeros(*reference["target_ids"].shape[:-1], len(unigram), dtype=torch.float64).scatter_add_(
        -1, reference["target_ids"], torch.where(reference["target_mask"], reference["target_probs"].double(), 0.0))
    q = torch.where(reference["kd_mask"][..., None], q, 0.0)
    assert_within_multinomial_bound(grads, exact_gradient(z, reference), q, z, int(reference["kd_mask"].sum()),
                                    draws=20)
