"""Helpers shared by several test files. Test files import from here (``from helpers import ...``;
tests/ is on ``sys.path`` through tests/conftest.py), never from one another: a test file is run,
not imported (tests/unit/test_test_layout.py checks it). Helpers an outside backend may need too
live in ``logitcache.testing``."""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from logitcache.capture.config import CaptureConfig
from logitcache.testing.targets import build

# every device the device-parametrised tests run on: CPU always, CUDA where present (no skip noise without it)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

SEQ_LEN = 32  # window length of the small tiny-teacher captures below
ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """The environment of a test's subprocess: no inherited DDP rank variables, one thread, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = env.get("PYTHONPATH")
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmarks_importable() -> Iterator[Path]:
    """``benchmarks/`` on ``sys.path`` (the scripts import their helpers as top-level ``common``); the modules
    imported from it are dropped afterwards (``common``, ``storage``: names too generic to leave behind)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield BENCHMARKS
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name, module in list(sys.modules.items()):
            if Path(getattr(module, "__file__", None) or "/").parent == BENCHMARKS:
                del sys.modules[name]


def free_port() -> int:
    """A TCP port free on the loopback interface now (a DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(teacher: str, out: Path, method: str = "sample", **over) -> CaptureConfig:
    """A ten-window tiny-teacher capture into ``out``, three sequences per shard; ``over`` overrides by dotted key."""
    base = {"teacher.model": teacher, "teacher.dtype": "float32", "corpus.seq_len": SEQ_LEN,
            "corpus.max_tokens": SEQ_LEN * 10, "store.path": str(out), "store.sequences_per_shard": 3,
            "sparsify.method": method, "sparsify.k": 5, "sparsify.samples": 20, "teacher.head_chunk": 7}
    return CaptureConfig().with_overrides({**base, **over})


# a ChatML template (the tiny teacher's tokenizer has none) and a small chat corpus: multi-turn, system, empty
# system, a conversation without an assistant turn, one long enough to need a long-sequence policy at seq_len 120
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a loop."},
                  {"role": "assistant", "content": "for"}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "while, which repeats while its condition holds."}]},
    {"messages": [{"role": "user", "content": "No answer here."}]},
    {"messages": [{"role": "user", "content": "Tell me about tuples " * 6},
                  {"role": "assistant", "content": "Tuples are immutable sequences of values. " * 5}]},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
]


def write_chat_corpus(directory: Path, rows: list[dict] = CHAT_ROWS) -> tuple[Path, Path]:
    """``rows`` as ``chat.jsonl`` and :data:`CHATML` as ``chatml.jinja`` in ``directory``: (corpus, template)."""
    path = directory / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    template = directory / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    return path, template


def cli_args(config: CaptureConfig) -> list[str]:
    """``logitcache capture`` arguments for the same capture as ``config``."""
    c = config
    return ["capture", "--teacher", c.teacher.model, "--dtype", c.teacher.dtype, "--seq-len", str(c.corpus.seq_len),
            "--head-chunk", str(c.teacher.head_chunk),
            "--max-tokens", str(c.corpus.max_tokens), "--out", c.store.path,
            "--sequences-per-shard", str(c.store.sequences_per_shard),
            "--method", c.sparsify.method, "--k", str(c.sparsify.k), "--samples", str(c.sparsify.samples),
            "--batch-tokens", str(c.batch_tokens), "--quiet"]


def make_items(teacher: torch.Tensor, lengths: list[int], method: str, seed: int = 0, **kw) -> list[dict]:
    """One dataset item per sequence: the first ``lengths[b]`` positions of ``teacher[b]`` (a dense
    ``[B, T, V]`` distribution), random input ids, labels drawn from it, and ``method``'s targets."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for b, n_pos in enumerate(lengths):
        t = teacher[b, :n_pos]
        labels = torch.multinomial(t, 1, generator=gen)[:, 0]
        input_ids = torch.randint(0, t.shape[-1], (n_pos,), generator=gen)
        items.append({"seq_id": 100 + b, "input_ids": input_ids, "labels": labels,
                      "targets": build(method, t, gen, **kw)})
    return items


# Hostile manifest fields, each with the start of the message that refuses it (docs/reliability.md), for a
# store of 4 shards × 3 sequences × seq_len 16: test_corruption.py applies them to a store on disk,
# test_manifest.py to the typed manifest.
HOSTILE_FIELDS = [
    (lambda m: m["shards"][1]["objects"][0].update(bytes=-5),
     "shards[1].objects[0].bytes is -5; expected an integer in [0, "),
    (lambda m: m["shards"][1].update(sequences="3"), "shards[1].sequences is '3'"),
    (lambda m: m["shards"][2].update(positions=10**30), "shards[2].positions is 1000000000000000000000000000000"),
    (lambda m: m["shards"][3].update(index=0), "shards[3].index is 0; expected a unique index"),
    (lambda m: m["shards"][0].update(index=99), "shards[0].index is 99; expected a unique index below plan.shards"),
    (lambda m: m["shards"][1].update(sequences=4), "shards[1].positions is 48; expected sequences × seq_len"),
    (lambda m: m["shards"][1]["objects"][0].pop("sha256"), "shards[1].objects[0].sha256 is missing"),
    (lambda m: m["shards"][1]["objects"][0].update(sha256="../../etc"),
     "shards[1].objects[0].sha256 is '../../etc'; expected 64"),
    (lambda m: m["shards"][1]["objects"][0].update(path=None), "shards[1].objects[0].path is None"),
    (lambda m: m["shards"][1].update(objects=[]), "shards[1].objects is []; expected a list of 1 to 1024"),
    (lambda m: m.update(shards={"0": {}}), "shards is {'0': {}}; expected a list"),
    (lambda m: m["shards"].append("x"), "shards[4] is 'x'; expected a mapping"),
    (lambda m: m.update(seq_len=10**12), "seq_len is 1000000000000; expected an integer in [1, 16777216]"),
    (lambda m: m.update(seq_len=-1), "seq_len is -1"),
    (lambda m: m["plan"].update(shards=True), "plan.shards is True"),
    (lambda m: m.update(method="evil"), "method is 'evil'; expected one of topk, sample, hybrid, full"),
    (lambda m: m["tokenizer"].update(fingerprint=7), "tokenizer.fingerprint is 7; expected a string"),
    (lambda m: m.pop("store"), "manifest.store is missing"),
]


def random_stream(rng: np.random.Generator, n: int, alphabet: int, contexts: int, skew: float):
    """``(symbols, contexts)`` of ``n`` symbols drawn from one Dirichlet(``skew``) distribution per context."""
    p = rng.dirichlet(np.full(alphabet, skew), size=contexts)
    ctx = rng.integers(0, contexts, n)
    sym = np.minimum((np.cumsum(p, axis=1)[ctx] < rng.random(n)[:, None]).sum(1), alphabet - 1)
    return sym, ctx


def tiny_store(teacher: str, path: Path, sequences: int, sequences_per_shard: int) -> str:
    """A sample-method store of ``sequences`` windows of 16 tokens captured with the tiny ``teacher``."""
    from logitcache.capture import capture

    capture(make_config(teacher, path, **{"corpus.seq_len": 16, "corpus.max_tokens": 16 * sequences,
                                          "store.sequences_per_shard": sequences_per_shard}), progress=False)
    return str(path)


def write_documents_store(root: str, method: str, rows: list, fingerprint: str, *, per_shard: int, k: int, n: int,
                          seq_len: int) -> str:
    """A documents store of ``rows`` (``(seq_id, tokens, mask, targets)`` each) through the store's own write path
    (begin, encode_unit, commit, finalize), ``per_shard`` rows a unit, recorded with tokenizer ``fingerprint``."""
    import dataclasses

    from logitcache.store.commit import begin_store, commit_unit, finalize_store
    from logitcache.store.containers import get_container
    from logitcache.store.fs import StoreFS
    from logitcache.store.manifest import TokenizerSection
    from logitcache.store.spec import spec_from_manifest
    from logitcache.store.writer import encode_unit
    from logitcache.testing.store_conformance import make_header

    header = make_header(method, "arrow", sequences=len(rows), per_shard=per_shard, k=k, n=n, seq_len=seq_len)
    header = dataclasses.replace(header, layout="documents", tokenizer=TokenizerSection(fingerprint))
    fs, spec = StoreFS(root), spec_from_manifest(header)
    begin_store(fs, header, get_container(spec.format).static_objects(spec), overwrite=False)
    records = []
    for index in range(-(-len(rows) // per_shard)):
        seq_ids, tokens, masks, targets = map(list, zip(*rows[index * per_shard:(index + 1) * per_shard]))
        record, objects = encode_unit(spec, index, seq_ids, tokens, targets, masks)
        commit_unit(fs, record, objects)
        records.append(record)
    finalize_store(fs, header, records)
    return root


def assert_within_multinomial_bound(grads: list[torch.Tensor], expected: torch.Tensor, q: torch.Tensor,
                                    z: torch.Tensor, positions: int, draws: int) -> None:
    """The mean of ``grads`` (one per RS-KD seed, of a KL term ``Σ (p·M̂ − q̂)/n`` over ``positions`` positions at
    logits ``z``) equals ``expected`` (the same term on the dense targets ``q``) elementwise within 5 standard errors
    of the mean plus three draws' worth (ids of probability ~1e-7 drawn once are no normal variable), and is ~10x
    closer than one seed. One seed's variance at id u is at most 2(p_u²·M(1−M) + q_u(1−q_u))/(N·n²)."""
    mass, p = q.sum(-1, keepdim=True), torch.softmax(z, -1)
    se = (2 * (p**2 * mass * (1 - mass) + q * (1 - q)) / draws).sqrt() / positions / len(grads) ** 0.5
    mean = torch.stack(grads).mean(0)
    error = (mean - expected).abs()
    resolution = 1.0 / (draws * len(grads)) / positions  # one draw more or less over all seeds
    assert (error <= 5 * se + 3 * resolution).all(), float(((error - 3 * resolution) / (se + 1e-30)).max())
    assert (mean - expected).norm() < 0.3 * (grads[0] - expected).norm()


def train_counting_decodes(trainer, *, resume: bool) -> int:
    """``trainer.train()`` (from its last checkpoint when ``resume``); returns how many items the store decoded."""
    import pytest

    from logitcache.train.store_reads import Store

    decoded, real_item = [0], Store.item

    def counting_item(self, index):
        decoded[0] += 1
        return real_item(self, index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "item", counting_item)
        trainer.train(resume_from_checkpoint=True if resume else None)
    return decoded[0]


def exact_gradient(z: torch.Tensor, batch: dict) -> torch.Tensor:
    """The gradient at student logits ``z`` of the exact-match KL term of a cross-tokenizer ``batch``."""
    from logitcache.train.losses_xtok import cross_tokenizer_terms

    zz = z.clone().requires_grad_()
    cross_tokenizer_terms(zz, batch).exact.backward()
    return zz.grad


def hf_and_vllm_teachers(config_for):
    """Yield ``(hf, vllm)`` teachers loaded from ``config_for("hf")`` and ``config_for("vllm")``; closes both after
    (a module fixture's body: ``yield from hf_and_vllm_teachers(config_for)``)."""
    from logitcache.capture.teachers import load_teacher

    hf = load_teacher(config_for("hf").teacher)
    vl = load_teacher(config_for("vllm").teacher)
    yield hf, vl
    vl.close()
    hf.close()


def as_interrupted(store: Path, committed: int) -> None:
    """Turn a complete store into what a capture killed after committing its first ``committed`` units leaves:
    their commit records, a manifest without unit entries, the other units' objects never written."""
    import shutil

    from logitcache.store import read_manifest
    from logitcache.store.commit import dump_json
    from logitcache.store.manifest import Manifest

    final = read_manifest(store)
    (store / "commits").mkdir()
    for record in final.shards[:committed]:
        (store / "commits" / f"{record.index:05d}.json").write_bytes(dump_json(record.to_dict()))
    for record in final.shards[committed:]:
        for obj in record.objects:
            path = store / obj.path
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (store / "manifest.json").write_bytes(dump_json(Manifest(final.header).to_dict()))
