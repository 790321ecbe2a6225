"""Plan: packing, window arithmetic, limits, stable ids and fingerprints, units, error messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitcache.capture.corpus import Document, read_documents
from logitcache.errors import ConfigError, CorpusError, TeacherError
from logitcache.capture.plan import Plan, Unit, build_plan, plan_units, seq_id_for, tokenizer_fingerprint


def docs(*texts: str) -> list[Document]:
    return [Document(t, f"mem:{i}") for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def pydoc_plan(tiny_tokenizer) -> Plan:
    return build_plan(read_documents("builtin:pydoc"), tiny_tokenizer, seq_len=64, max_tokens=None)


def test_packing_appends_eos_after_each_document(tiny_tokenizer):
    texts = ["hello world", "  \n ", "def f(x): return x", "", "last one"]
    plan = build_plan(docs(*texts), tiny_tokenizer, seq_len=4, max_tokens=None)
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for t in texts:
        if t.strip():
            expected += tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    assert plan.tokens.dtype == np.int32
    assert plan.tokens.tolist() == expected
    assert plan.stats["documents"] == 5 and plan.stats["empty_documents_skipped"] == 2
    assert plan.stats["documents_tokenized"] == 3


def test_windows_overlap_by_one_and_labels_tile_the_stream(pydoc_plan):
    plan, s = pydoc_plan, pydoc_plan.seq_len
    assert plan.num_windows == (plan.tokens.size - 1) // s
    labels = np.concatenate([plan.window(i)[1:] for i in range(plan.num_windows)])
    # every token but the first, up to the last full window, is a label exactly once, in order
    assert np.array_equal(labels, plan.tokens[1 : plan.num_windows * s + 1])
    for i in range(plan.num_windows - 1):
        assert plan.window(i)[-1] == plan.window(i + 1)[0]
        assert plan.window(i).shape == (s + 1,) and plan.window(i).dtype == np.int32
    stacked = plan.windows(2, 5)
    assert stacked.shape == (3, s + 1) and np.array_equal(stacked[1], plan.window(3))


def test_stats_are_consistent(pydoc_plan):
    st = pydoc_plan.stats
    from pydoc_data.topics import topics

    assert st["documents"] == len(topics)
    assert st["tokens"] == pydoc_plan.tokens.size
    assert st["windows"] == pydoc_plan.num_windows
    assert st["tokens_in_windows"] == st["windows"] * pydoc_plan.seq_len + 1
    assert st["tail_tokens_skipped"] == st["tokens"] - st["tokens_in_windows"]
    assert 0 <= st["tail_tokens_skipped"] < pydoc_plan.seq_len


def test_window_is_read_only_view(pydoc_plan):
    w = pydoc_plan.window(0)
    assert np.shares_memory(w, pydoc_plan.tokens)
    with pytest.raises(ValueError):
        w[0] = 1
    with pytest.raises(IndexError, match="out of range"):
        pydoc_plan.window(pydoc_plan.num_windows)


def test_tail_exact_fit(tiny_tokenizer):
    full = build_plan(docs("abc def ghi jkl mno pqr stu"), tiny_tokenizer, seq_len=1, max_tokens=None)
    n = full.tokens.size
    exact = build_plan(docs("abc def ghi jkl mno pqr stu"), tiny_tokenizer, seq_len=n - 1, max_tokens=None)
    assert exact.num_windows == 1 and exact.stats["tail_tokens_skipped"] == 0
    assert full.num_windows == n - 1


@pytest.mark.parametrize("max_tokens", [1, 63, 64, 65, 640, 10**9])
def test_max_tokens_keeps_first_windows_with_same_ids(tiny_tokenizer, pydoc_plan, max_tokens):
    plan = build_plan(read_documents("builtin:pydoc"), tiny_tokenizer, seq_len=64, max_tokens=max_tokens)
    expected = min(math.ceil(max_tokens / 64), pydoc_plan.num_windows)
    assert plan.num_windows == expected
    assert plan.corpus_fingerprint == pydoc_plan.corpus_fingerprint
    assert plan.stats["documents"] == pydoc_plan.stats["documents"]
    for i in range(plan.num_windows):
        assert np.array_equal(plan.window(i), pydoc_plan.window(i))
        assert plan.seq_id(i) == pydoc_plan.seq_id(i)
    if expected < pydoc_plan.num_windows:  # stops tokenizing once the windows are complete
        assert plan.stats["documents_tokenized"] < pydoc_plan.stats["documents_tokenized"]


def test_seq_ids_deterministic_distinct_63_bit(pydoc_plan, tiny_tokenizer):
    again = build_plan(read_documents("builtin:pydoc"), tiny_tokenizer, seq_len=64, max_tokens=None)
    ids = [pydoc_plan.seq_id(i) for i in range(pydoc_plan.num_windows)]
    assert ids == [again.seq_id(i) for i in range(again.num_windows)]
    assert len(set(ids)) == len(ids) and all(0 <= x < 2**63 for x in ids)
    assert seq_id_for(pydoc_plan.corpus_fingerprint, 64, 0) == ids[0]
    assert seq_id_for(pydoc_plan.corpus_fingerprint, 65, 0) != ids[0]
    assert np.array_equal(again.tokens, pydoc_plan.tokens)


def test_corpus_fingerprint_is_text_only_and_length_prefixed(tiny_tokenizer):
    a = build_plan(docs("ab c", "d e f"), tiny_tokenizer, seq_len=2, max_tokens=None)
    b = build_plan(docs("ab", " cd e f"), tiny_tokenizer, seq_len=2, max_tokens=None)
    c = build_plan(docs("ab c", "d e f"), tiny_tokenizer, seq_len=3, max_tokens=None, eos_id=1)
    assert a.corpus_fingerprint != b.corpus_fingerprint  # same concatenation, different boundaries
    assert a.corpus_fingerprint == c.corpus_fingerprint  # independent of seq_len and eos
    assert len(a.corpus_fingerprint) == 64


def test_tokenizer_fingerprint(tiny_teacher):
    from transformers import AutoTokenizer

    t1 = AutoTokenizer.from_pretrained(tiny_teacher)
    t2 = AutoTokenizer.from_pretrained(tiny_teacher)
    fp = tokenizer_fingerprint(t1)
    assert fp == tokenizer_fingerprint(t2) and len(fp) == 64
    t2.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(t2) != fp


def test_tokenizer_fingerprint_changes_with_one_vocab_entry():
    class FakeTok:
        special_tokens_map = {"eos_token": "</s>"}
        all_special_tokens = ["</s>"]

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    base = {"</s>": 0, "a": 1, "b": 2}
    fp = tokenizer_fingerprint(FakeTok(base))
    assert tokenizer_fingerprint(FakeTok(dict(reversed(base.items())))) == fp  # order-free
    assert tokenizer_fingerprint(FakeTok({**base, "b": 3})) != fp  # renumbered
    assert tokenizer_fingerprint(FakeTok({"</s>": 0, "a": 1, "c": 2})) != fp  # renamed
    other = FakeTok(base)
    other.special_tokens_map = {"eos_token": "a"}
    assert tokenizer_fingerprint(other) != fp


@pytest.mark.parametrize(("n", "per", "sizes"), [(10, 4, [4, 4, 2]), (8, 4, [4, 4]), (3, 16, [3]), (5, 1, [1] * 5)])
def test_plan_units(tiny_tokenizer, n, per, sizes):
    plan = Plan(np.zeros(n * 2 + 1, dtype=np.int32), 2, n, "f" * 64, {})
    units = plan_units(plan, per)
    assert [u.size for u in units] == sizes
    assert [u.index for u in units] == list(range(len(sizes)))
    assert units[0].start == 0 and units[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))
    assert isinstance(units[0], Unit)
    with pytest.raises(ConfigError, match="sequences_per_shard"):
        plan_units(plan, 0)


def test_empty_corpus(tiny_tokenizer):
    with pytest.raises(CorpusError, match="empty corpus"):
        build_plan([], tiny_tokenizer, seq_len=4, max_tokens=None)


def test_all_documents_empty(tiny_tokenizer):
    with pytest.raises(CorpusError, match=r"all 3 documents are empty or whitespace-only"):
        build_plan(docs("", " \n", "\t"), tiny_tokenizer, seq_len=4, max_tokens=None)


def test_too_few_tokens_says_counts_and_fix(tiny_tokenizer):
    plan = build_plan(docs("hi"), tiny_tokenizer, seq_len=1, max_tokens=None)
    n = plan.tokens.size
    with pytest.raises(CorpusError) as err:
        build_plan(docs("hi"), tiny_tokenizer, seq_len=n, max_tokens=None)
    msg = str(err.value)
    assert f"has {n} tokens" in msg and f"seq_len + 1 = {n + 1}" in msg and "--seq-len" in msg


def test_window_must_fit_teacher(tiny_tokenizer):
    with pytest.raises(TeacherError, match=r"seq_len = 257 .*max_positions = 256"):
        build_plan(docs("x"), tiny_tokenizer, seq_len=257, max_tokens=None, max_positions=256)
    plan = build_plan(docs("x " * 400), tiny_tokenizer, seq_len=256, max_tokens=None, max_positions=256)
    assert plan.window(0).size == 257


def test_eos_required(tiny_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(CorpusError, match="eos"):
        build_plan(docs("x"), NoEos(), seq_len=1, max_tokens=None)
    plan = build_plan(docs("a", "b"), tiny_tokenizer, seq_len=1, max_tokens=None, eos_id=1)
    assert plan.tokens[-1] == 1


@pytest.mark.parametrize(("kw", "match"), [({"seq_len": 0}, "seq_len"), ({"seq_len": 2, "max_tokens": 0}, "max_tokens")])
def test_bad_arguments(tiny_tokenizer, kw, match):
    kw.setdefault("max_tokens", None)
    with pytest.raises(ConfigError, match=match):
        build_plan(docs("x"), tiny_tokenizer, **kw)


# ---------------------------------------------------------------- long documents (memory bound, #19 item 3)

def real_text(limit: int) -> str:
    """Python's own sources (sorted, as UTF-8) then its help topics: real code and prose, ``limit`` characters."""
    import sysconfig
    from pathlib import Path

    from pydoc_data.topics import topics

    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size >= limit:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
    return ("".join(parts) + "".join(topics[k] for k in sorted(topics)))[:limit]


def hostile_texts() -> dict[str, str]:
    """Texts without the usual split points: one run of a letter, one whitespace run, digits, base64, CJK + emoji."""
    import base64
    import random

    rng = random.Random(0)
    return {
        "letters": "a" * 30_000,
        "spaces": "x" + " " * 30_000 + "y",  # no sync point anywhere: the whole-rest fallback
        "newlines": "\n" * 10_000 + "z" + "\r\n" * 5_000,
        "base64": base64.b64encode(rng.randbytes(30_000)).decode(),
        "cjk": "".join(rng.choice("漢字かなカナ한국어😀🎉€ ") for _ in range(20_000)),
        "one line": real_text(60_000).replace("\n", " "),
    }


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's byte-level BPE tokenizer, from the converted embedded teacher."""
    from transformers import AutoTokenizer

    from logitcache.models.embedded import is_complete
    from logitcache.models.home import logitcache_home

    path = logitcache_home() / "teachers" / "smollm2-135m-instruct"
    if not is_complete(path):
        pytest.skip(f"embedded teacher not converted at {path}; `logitcache capture` once converts it")
    return AutoTokenizer.from_pretrained(path)


def windowed_ids(tokenizer, text: str, *, window: int, overlap: int, piece: int = 997) -> tuple[list[int], bool]:
    from logitcache.capture.windowed import WindowedTokenizer

    w = WindowedTokenizer(tokenizer, window=window, overlap=overlap)
    out = [ids for i in range(0, len(text), piece) for ids in w.feed(text[i : i + piece])] + w.finish()
    return np.concatenate(out).tolist(), w.whole


@pytest.mark.parametrize("which", ["tiny", "smol"])
@pytest.mark.parametrize(("window", "overlap"), [(1024, 256), (4096, 512), (1 << 16, 1 << 12)])
def test_windowed_tokenization_equals_whole_text_on_real_text(request, which, window, overlap):
    tokenizer = request.getfixturevalue("tiny_tokenizer" if which == "tiny" else "smol_tokenizer")
    text = real_text(600_000)
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    got, fell_back = windowed_ids(tokenizer, text, window=window, overlap=overlap)
    assert got == whole
    assert not fell_back or window == 1024  # real text always had a sync point in the larger overlaps


@pytest.mark.parametrize("which", ["tiny", "smol"])
@pytest.mark.parametrize("name", list(hostile_texts()))
def test_windowed_tokenization_equals_whole_text_on_hostile_text(request, which, name):
    tokenizer = request.getfixturevalue("tiny_tokenizer" if which == "tiny" else "smol_tokenizer")
    text = hostile_texts()[name]
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    got, fell_back = windowed_ids(tokenizer, text, window=2048, overlap=512)
    assert got == whole
    assert fell_back == (name == "spaces")


class CountingTokenizer:
    """The real tokenizer, recording how many characters each call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []
        self.eos_token_id, self.is_fast = tokenizer.eos_token_id, tokenizer.is_fast

    def __call__(self, texts, **kw):
        self.calls.append(len(texts) if isinstance(texts, str) else sum(map(len, texts)))
        return self.tokenizer(texts, **kw)


def reference_fingerprint(texts: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(len(t.encode()).to_bytes(8, "little") + t.encode())
    return h.hexdigest()


def test_long_documents_pack_as_whole_tokenization_in_bounded_calls(tiny_tokenizer):
    from logitcache.capture.plan import BATCH_CHARS
    from logitcache.capture.windowed import WINDOW_CHARS

    text = real_text(2_000_000)
    texts = [text[:500], text[:1_500_000], "  \n" * 40_000, text[7:60_007], text[-300_000:], "tail",
             " \n" * 30_000 + text[:40_000],  # whitespace waits for the text after it
             " \x1c" * 100_000] + [text[:50_000]] * 12  # blank to Python, but many pre-tokens (sync points) to BPE
    spy = CountingTokenizer(tiny_tokenizer)
    plan = build_plan(docs(*texts), spy, seq_len=64, max_tokens=None)
    eos, expected = tiny_tokenizer.eos_token_id, []
    for t in texts:
        if t.strip():
            expected += tiny_tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
    assert plan.tokens.tolist() == expected
    assert plan.corpus_fingerprint == reference_fingerprint(texts)
    assert plan.stats["documents"] == 20 and plan.stats["empty_documents_skipped"] == 2
    assert plan.stats["documents_tokenized"] == 18
    assert max(spy.calls) <= max(BATCH_CHARS, WINDOW_CHARS)  # never one call on a whole long document


@pytest.mark.parametrize("max_tokens", [1, 2000, 64 * 300])
def test_max_tokens_cuts_a_long_completing_document(tiny_tokenizer, max_tokens):
    text = real_text(3_000_000)
    texts = ["a short first document", text, "after"]
    spy = CountingTokenizer(tiny_tokenizer)
    plan = build_plan(docs(*texts), spy, seq_len=64, max_tokens=max_tokens)
    wanted = math.ceil(max_tokens / 64) * 64 + 1
    first = tiny_tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    prefix = tiny_tokenizer(text[:200_000], add_special_tokens=False, verbose=False)["input_ids"]
    assert plan.tokens.tolist() == (first + prefix)[:wanted]  # cut right after the wanted tokens, no EOS
    assert plan.stats["tokens"] == wanted and plan.stats["tail_tokens_skipped"] == 0
    assert plan.stats["documents"] == 3 and plan.stats["documents_tokenized"] == 2
    assert plan.corpus_fingerprint == reference_fingerprint(texts)  # every document still read
    assert sum(spy.calls) < 200_000  # tokenized only as far as needed, not the 3 MB


@pytest.mark.parametrize("variant", ["lf", "crlf", "bom+crlf"])
def test_a_text_file_read_in_pieces_plans_as_its_whole_text(tiny_tokenizer, tmp_path, monkeypatch, variant):
    from logitcache.capture import corpus as corpus_module
    from logitcache.capture.corpus import TextFileDocument, open_corpus

    monkeypatch.setattr(corpus_module, "PIECE_BYTES", 100_003)  # ~10 pieces, cut inside characters and CRLFs
    text = real_text(1_000_000)
    text = text if variant == "lf" else text.replace("\n", "\r\n")
    path = tmp_path / "sources.txt"
    path.write_bytes(b"\xef\xbb\xbf" * variant.startswith("bom") + text.encode())
    corpus = open_corpus(str(path))
    plan = build_plan(corpus.documents(), tiny_tokenizer, seq_len=64, max_tokens=None)
    assert isinstance(next(corpus.documents()), TextFileDocument)
    whole = tiny_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert plan.tokens.tolist() == whole + [tiny_tokenizer.eos_token_id]
    assert plan.corpus_fingerprint == reference_fingerprint([text])
    assert plan.stats["documents"] == plan.stats["documents_tokenized"] == 1


MEMORY_CHILD = r"""
import json, resource, sys
from transformers import AutoTokenizer
from logitcache.capture.corpus import read_documents
from logitcache.capture.plan import build_plan

def status(key):
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith(key + ":"))

teacher, path, max_tokens, limit = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(teacher)
tokenizer("warm up " * 100, add_special_tokens=False)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS
base, vm = status("VmHWM"), status("VmSize")
resource.setrlimit(resource.RLIMIT_AS, (vm + limit, vm + limit))  # the unfixed plan fails here, not the machine
plan = build_plan(read_documents(path), tokenizer, seq_len=64, max_tokens=max_tokens)
print(json.dumps({"growth": status("VmHWM") - base, "fingerprint": plan.corpus_fingerprint,
                  "head": plan.tokens[:300].tolist(), "tokens": int(plan.tokens.size)}))
"""



def memory_bound(tokens: int) -> int:
    """docs/capture.md "Memory": 8 bytes per packed token (chunks + the joined stream), 96 MiB for reading,
    tokenizing and slack, whatever the file's size. Holding the file's text (bytes, then str) grew 2 bytes
    per byte; before windows, one tokenizer call grew ~240 bytes per character."""
    return 8 * tokens + (96 << 20)


@pytest.mark.parametrize(("layout", "size", "max_tokens"), [("multi-line", 200 << 20, 2000), ("single-line", 50 << 20, 2000),
                                                            ("multi-line", 16 << 20, None)])
def test_planning_a_large_document_stays_within_the_memory_bound(tiny_teacher, tiny_tokenizer, tmp_path, layout,
                                                                  size, max_tokens):
    import hashlib
    import json
    import subprocess
    import sys

    unit = real_text(1_000_000)
    unit = unit if layout == "multi-line" else unit.replace("\n", " ")
    text = (unit * (size // len(unit) + 1))[:size]
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, tiny_teacher, str(path), json.dumps(max_tokens),
                          str(3 << 30)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"planning a {size >> 20} MB document failed under a 3 GB limit:\n{run.stderr[-2000:]}"
    got = json.loads(run.stdout)
    data = text.encode()
    assert got["fingerprint"] == hashlib.sha256(len(data).to_bytes(8, "little") + data).hexdigest()
    assert got["head"] == tiny_tokenizer(text[:5000], add_special_tokens=False)["input_ids"][:300]
    bound = memory_bound(got["tokens"])
    assert got["growth"] < bound, f"peak RSS grew by {got['growth'] >> 20} MiB planning {size >> 20} MB; bound {bound >> 20}"
