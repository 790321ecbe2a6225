"""HFTeacher: chunked logits equal model(x).logits, batch invariance, refusals, identity hash."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from logitcache.capture.config import TeacherConfig
from logitcache.errors import TeacherError
from logitcache.capture.teachers import HFTeacher, Teacher, weights_sha256


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "home"))


def _config(path, **kw) -> TeacherConfig:
    return TeacherConfig(model=str(path), device=kw.pop("device", "cpu"), dtype=kw.pop("dtype", "float32"), **kw)


def _dense(teacher: HFTeacher, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    rows: dict[int, list[torch.Tensor]] = {}
    order = []
    for row, start, logits in teacher.forward_chunks(ids, chunk):
        assert logits.shape == (min(chunk, ids.shape[1] - start), teacher.vocab_size)
        rows.setdefault(row, []).append(logits.clone())
        order.append((row, start))
    assert order == [(r, s) for r in range(ids.shape[0]) for s in range(0, ids.shape[1], chunk)]
    return torch.stack([torch.cat(rows[r]) for r in range(ids.shape[0])])


def _ids(teacher: HFTeacher, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, teacher.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _save_tiny(path: Path, model_cls, config, seed: int = 0) -> Path:
    from logitcache.testing.tiny import make_tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    model.save_pretrained(path)
    make_tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def _small(config_cls, **kw):
    return config_cls(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> HFTeacher:
    return HFTeacher.load(_config(tiny_teacher))


def test_protocol_and_identity(teacher, tiny_teacher):
    assert isinstance(teacher, Teacher)
    ident = teacher.identity()
    assert ident["backend"] == "hf" and ident["dtype"] == "float32" and ident["vocab_size"] == 300
    assert ident["name"] == str(tiny_teacher)
    expected = hashlib.sha256((Path(tiny_teacher) / "model.safetensors").read_bytes()).hexdigest()
    assert ident["weights_sha256"] == expected
    assert teacher.max_positions == 256 and teacher.eos_id == 0


@pytest.mark.parametrize(("length", "chunk"), [(1, 1), (7, 3), (33, 8), (65, 64), (65, 65), (37, 100), (256, 17)])
def test_chunks_equal_full_logits(teacher, length, chunk):
    ids = _ids(teacher, 3, length)
    ours = _dense(teacher, ids, chunk)
    torch.testing.assert_close(ours, teacher.bare_forward(ids), rtol=1e-5, atol=1e-5)


def test_batch_invariance_bitwise(teacher):
    ids = _ids(teacher, 5, 129)
    batched = _dense(teacher, ids, 32)
    alone = torch.cat([_dense(teacher, ids[i : i + 1], 32) for i in range(5)])
    split = torch.cat([_dense(teacher, ids[i : i + 2], 32) for i in range(0, 5, 2)])
    assert torch.equal(batched, alone) and torch.equal(batched, split)


def test_bad_inputs_refused(teacher):
    with pytest.raises(TeacherError, match="int64"):
        next(teacher.forward_chunks(torch.zeros(2, 4), 2))
    with pytest.raises(TeacherError, match="chunk"):
        next(teacher.forward_chunks(torch.zeros(2, 4, dtype=torch.long), 0))
    with pytest.raises(TeacherError, match="256 positions"):
        teacher.forward_chunks(torch.zeros(1, 257, dtype=torch.long), 8)
    with pytest.raises(TeacherError, match=r"\[0, 300\)"):
        teacher.forward_chunks(torch.full((1, 4), 300), 8)


def test_missing_dir_refused(tmp_path):
    with pytest.raises(TeacherError, match="does not exist.*config.json.*hub downloads are not available"):
        HFTeacher.load(_config(tmp_path / "nope"))
    with pytest.raises(TeacherError, match="without config.json"):
        HFTeacher.load(_config(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(TeacherError, match="is a file"):
        HFTeacher.load(_config(tmp_path / "model.gguf"))


def _copy_with_config(src, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_remote_code_refused(tiny_teacher, tmp_path):
    path = _copy_with_config(tiny_teacher, tmp_path / "remote", auto_map={"AutoModelForCausalLM": "m.Model"})
    with pytest.raises(TeacherError, match=r"remote.*--trust-remote-code|--trust-remote-code") as info:
        HFTeacher.load(_config(path))
    assert "remote" in str(info.value) and "auto_map" in str(info.value)


def test_unknown_logit_postprocessing_refused(tiny_teacher, tmp_path):
    # A Llama forward ignores logit_scale; applying it in the chunked head must fail the parity check.
    path = _copy_with_config(tiny_teacher, tmp_path / "scaled", logit_scale=3.0)
    with pytest.raises(TeacherError, match=r"scaled.*does not reproduce model\(x\)\.logits.*max deviation"):
        HFTeacher.load(_config(path))


def test_model_that_modifies_logits_refused(tiny_teacher):
    from transformers import AutoTokenizer, LlamaForCausalLM

    class Biased(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 0.5
            return out

    model = Biased.from_pretrained(tiny_teacher, dtype=torch.float32)
    with pytest.raises(TeacherError, match=r"Biased.*max deviation 0\.5"):
        HFTeacher(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_teacher), name="biased", weights_sha256="")


def test_gemma2_softcapping(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip("transformers has no Gemma2")
    config = _small(transformers.Gemma2Config, head_dim=8, final_logit_softcapping=0.1)
    path = _save_tiny(tmp_path / "gemma2", transformers.Gemma2ForCausalLM, config)
    teacher = HFTeacher.load(_config(path))
    assert teacher.post.softcap == 0.1
    ids = _ids(teacher, 2, 19)
    ours = _dense(teacher, ids, 6)
    torch.testing.assert_close(ours, teacher.bare_forward(ids), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        raw = teacher.head(teacher.body(input_ids=ids).last_hidden_state)
    assert ours.abs().max() < 0.1 < raw.abs().max()  # the cap was applied, and mattered


def test_cohere_logit_scale(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = _small(transformers.CohereConfig, logit_scale=0.25)
    path = _save_tiny(tmp_path / "cohere", transformers.CohereForCausalLM, config)
    teacher = HFTeacher.load(_config(path))
    assert teacher.post.logit_scale == 0.25
    ids = _ids(teacher, 2, 11)
    torch.testing.assert_close(_dense(teacher, ids, 4), teacher.bare_forward(ids), rtol=1e-5, atol=1e-6)


def test_bfloat16_parity_and_dtype(tiny_teacher):
    teacher = HFTeacher.load(_config(tiny_teacher, dtype="bfloat16"))
    assert teacher.identity()["dtype"] == "bfloat16"
    ids = _ids(teacher, 2, 40)
    ours = _dense(teacher, ids, 16)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), teacher.bare_forward(ids).float(), rtol=2e-2, atol=2e-2)
    teacher.close()


def test_weights_hash_stable_and_cached(tiny_teacher, tmp_path):
    from logitcache.testing.tiny import make_tiny_teacher

    first = weights_sha256(tiny_teacher)
    cache = tmp_path / "home" / "hashes.json"
    assert cache.is_file() and first in cache.read_text()
    assert weights_sha256(tiny_teacher) == first
    other = make_tiny_teacher(tmp_path / "other", seed=1)
    second = weights_sha256(other)
    assert second != first
    assert HFTeacher.load(_config(other)).identity()["weights_sha256"] == second
    # Rewriting the weights in place (same size) invalidates the cached entry.
    make_tiny_teacher(tmp_path / "other", seed=2)
    third = weights_sha256(other)
    assert third not in (first, second)
    assert third == hashlib.sha256((Path(other) / "model.safetensors").read_bytes()).hexdigest()


def test_device_resolution():
    from logitcache.capture.teachers.hf import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TeacherError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_teacher, teacher):
    gpu = HFTeacher.load(_config(tiny_teacher, device="auto"))
    assert gpu.device.type == "cuda"
    ids = _ids(teacher, 3, 70)
    ours = _dense(gpu, ids, 32)
    assert ours.device.type == "cuda"
    torch.testing.assert_close(ours.cpu(), _dense(teacher, ids, 32), rtol=1e-4, atol=1e-4)
    gpu.close()
