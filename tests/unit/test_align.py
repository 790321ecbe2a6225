"""Cross-tokenizer alignment (logitcache/train/align.py): token bytes of a byte-level BPE (the embedded
SmolLM2 teacher, the tiny BPE) and of a SentencePiece-style Unigram with byte fallback, re-tokenization of
the teacher's bytes, and the byte-span groups, checked against a character-span reference computed from
the strings each tokenizer decodes its token prefixes to."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.errors import ConfigError, TargetsError
from logitcache.train.align import align, encode_student, token_bytes_table

TEXTS = [
    "héllo  wörld — naïve café",                      # 2- and 3-byte characters
    "emoji 😀👍🏽 and flags 🇫🇷!",                      # 4-byte characters, modifiers, pairs
    "spaces:    four\t\ttabs\n\n\nnewlines   end  ",    # whitespace runs
    "digits 1234567890 3.14159 0x1F 1e-9 2024-01-31",
    "def f(x: int) -> int:\n    return x ** 2  # 日本語のコメント\n",
    "<|endoftext|>text after a special token",
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from logitcache.models.embedded import resolve_teacher_path

    try:
        path = resolve_teacher_path("embedded:smollm2-135m-instruct")
    except Exception as exc:  # noqa: BLE001 - not converted on this machine
        pytest.skip(f"the embedded teacher is not converted: {exc}")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def unigram():
    from logitcache.testing.tokenizers import make_unigram_tokenizer

    return make_unigram_tokenizer()


@pytest.fixture(scope="module")
def tiny_bpe():
    from logitcache.testing.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer()


def groups_partition(al, teacher_ends, student_ends):
    """Every byte in exactly one group: each group's spans on either side tile exactly its byte range."""
    for ends, group in ((teacher_ends, al.teacher_group), (student_ends, al.student_group)):
        starts = np.concatenate([[0], ends[:-1]])
        assert np.all(np.diff(group) >= 0)  # groups in order, contiguous on both sides
        for g in range(al.num_groups):
            inside = group == g
            assert inside.any(), f"group {g} has no span"
            assert starts[inside][0] == al.bounds[g] and ends[inside][-1] == al.bounds[g + 1]
    assert al.bounds[0] == 0 and np.all(np.diff(al.bounds) > 0)


def reference_boundaries(tokenizer, text: str) -> set[int]:
    """Character positions where the tokenizer's tokens of ``text`` are cut, from decoded strings: ``m`` such
    that the first ``k`` tokens decode to exactly ``text[:m]`` for some ``k`` (a prefix ending inside a
    character decodes to a replacement character, so it is no cut)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cuts = set()
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(prefix):
            cuts.add(len(prefix))
    return cuts


def char_boundaries(al, text: str) -> set[int]:
    """The group bounds of ``al`` (bytes) that fall between characters, as character positions."""
    byte_at = np.cumsum([0] + [len(c.encode()) for c in text])
    char_of = {int(b): i for i, b in enumerate(byte_at)}
    return {char_of[int(b)] for b in al.bounds[1:] if int(b) in char_of}


def test_align_hand_built_spans():
    # teacher "ab|cde|f", student "ab|c|def": groups "ab" (1:1) and "cdef" (2 teacher : 2 student)
    al = align(np.array([2, 5, 6]), np.array([2, 3, 6]))
    assert al.bounds.tolist() == [0, 2, 6]
    assert al.teacher_group.tolist() == [0, 1, 1] and al.student_group.tolist() == [0, 1, 1]
    # many teacher : one student, then one : many
    al = align(np.array([1, 2, 3, 6]), np.array([3, 4, 5, 6]))
    assert al.teacher_count.tolist() == [3, 1] and al.student_count.tolist() == [1, 3]
    groups_partition(al, np.array([1, 2, 3, 6]), np.array([3, 4, 5, 6]))
    # a zero-width span joins the group it ends in
    al = align(np.array([0, 2, 4]), np.array([2, 2, 4]))
    assert al.teacher_group.tolist() == [0, 0, 1] and al.student_group.tolist() == [0, 0, 1]
    with pytest.raises(TargetsError, match="cover the same bytes"):
        align(np.array([2, 5]), np.array([2, 4]))


@pytest.mark.parametrize("pair", ["smollm2-unigram", "smollm2-tiny", "tiny-unigram", "unigram-smollm2"])
def test_alignment_against_character_reference(pair, request):
    names = {"smollm2": "smollm2", "unigram": "unigram", "tiny": "tiny_bpe"}
    t_name, s_name = pair.split("-")
    teacher, student = request.getfixturevalue(names[t_name]), request.getfixturevalue(names[s_name])
    t_bytes, s_bytes = token_bytes_table(teacher), token_bytes_table(student)
    for text in TEXTS:
        ids = np.asarray(teacher(text, add_special_tokens=False)["input_ids"])
        data = t_bytes.join(ids)
        shift = len(data) - len(text.encode())  # SentencePiece's dummy prefix: one space before the text
        assert data == b" " * shift + text.encode() and shift == (0 if t_bytes.kind == "byte_level" else 1)
        t_ends = np.cumsum(t_bytes.lengths(ids, text))
        st = encode_student(student, s_bytes, data)
        seen = data.decode()  # the text the student reads
        assert st.ids.tolist() == student(seen, add_special_tokens=False)["input_ids"]
        al = align(t_ends, st.span_ends())
        groups_partition(al, t_ends, st.span_ends())
        expected = {c + shift for c in reference_boundaries(teacher, text)} & reference_boundaries(student, seen)
        assert char_boundaries(al, seen) == expected, text


def test_token_bytes(smollm2, unigram):
    sm, uni = token_bytes_table(smollm2), token_bytes_table(unigram)
    assert sm.kind == "byte_level" and uni.kind == "sentencepiece"
    assert sm.table[smollm2.convert_tokens_to_ids("Ġworld")] == b" world"
    assert sm.table[smollm2.unk_token_id] == b"<|endoftext|>"  # a byte-level vocabulary lacks no text
    assert uni.table[unigram.convert_tokens_to_ids("<0xF0>")] == b"\xf0"
    assert uni.table[unigram.convert_tokens_to_ids("▁the")] == b" the"
    assert uni.table[unigram.unk_token_id] is None
    with pytest.raises(TargetsError, match=r"token ids \[0\] have no known bytes"):
        uni.lengths(np.array([5, 0]), "row 3")


def test_partial_characters_at_window_edges(smollm2, unigram):
    text = "😀 ok 😀"
    ids = np.asarray(smollm2(text, add_special_tokens=False)["input_ids"])
    t_bytes = token_bytes_table(smollm2)
    lengths = t_bytes.lengths(ids, text)
    assert lengths[0] < 4 and lengths[-1] < 4  # the emoji is split into byte tokens on both ends
    data = t_bytes.join(ids)[lengths[0]:-lengths[-1]]  # a window cut inside both emoji
    st = encode_student(unigram, token_bytes_table(unigram), data)
    assert st.lo == 4 - lengths[0] and st.hi == len(data) - (4 - lengths[-1])
    assert st.span_ends()[0] == st.lo and st.span_ends()[-1] == len(data)
    with pytest.raises(TargetsError, match="not UTF-8 at byte 2"):
        encode_student(unigram, token_bytes_table(unigram), b"ok\xffok")


def test_unknown_token_bytes_are_refused():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(ConfigError, match="has no known token bytes; expected a byte-level BPE"):
        token_bytes_table(PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"))
    with pytest.raises(ConfigError, match="no fast"):
        token_bytes_table(object())
