"""The shared output head: read from safetensors alone, it equals the HF model's own head."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from logitcache.errors import TeacherError
from logitcache.capture.teachers.head import HeadPost, load_output_head


def hf_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_head_from_checkpoint_reproduces_the_hf_teacher(tiny_teacher):
    from logitcache.capture.config import TeacherConfig
    from logitcache.capture.teachers import HFTeacher

    hf = HFTeacher.load(TeacherConfig(model=tiny_teacher, dtype="float32", device="cpu"))
    head = load_output_head(Path(tiny_teacher), hf_config(tiny_teacher), device=torch.device("cpu"),
                            dtype=torch.float32, name="tiny")
    assert torch.equal(head.weight, hf.head.weight)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = hf.body(input_ids=ids).last_hidden_state
        ours = [c for r in range(2) for _, c in head.chunks(hidden[r], 7)]
        theirs = [c for _, _, c in hf.forward_chunks(ids, 7)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_checkpoint_without_a_head_is_refused(tiny_teacher, tmp_path):
    src = Path(tiny_teacher)
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if "lm_head" not in k}
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match="cannot find the output head.*tie_word_embeddings=False.*backend 'hf'"):
        load_output_head(tmp_path, hf_config(tmp_path), device=torch.device("cpu"), dtype=torch.float32, name="x")


def test_head_post_reads_every_known_post_processing():
    class Cfg:
        logit_scale, logits_scaling, final_logit_softcapping = 0.0625, 8.0, 30.0

    post = HeadPost.from_config(Cfg())
    assert post == HeadPost(logit_scale=0.0625, logits_scaling=8.0, softcap=30.0)
    x = torch.tensor([[1000.0, -3.0]])
    assert torch.allclose(post.apply(x), 30.0 * torch.tanh(x * 0.0625 / 8.0 / 30.0))
