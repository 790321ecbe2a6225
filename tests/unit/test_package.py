"""Package surface: cheap import, public names, every job config validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import logitcache
from logitcache.capture.config import CaptureConfig

ROOT = Path(__file__).resolve().parents[2]


def test_import_does_not_pull_heavy_engines():
    code = ("import sys, logitcache; heavy = [m for m in ('vllm', 'ray', 'transformers', 'datasets') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_backends_and_orchestration_import_neither_vllm_nor_ray():
    """Every module imports vllm / ray lazily: only using the vllm backend or Ray capture loads them."""
    code = ("import sys, logitcache, logitcache.cli, logitcache.capture.pipeline, logitcache.capture.distributed, "
            "logitcache.capture.teachers, logitcache.capture.teachers.vllm, logitcache.capture.teachers.head; "
            "print(','.join(m for m in ('vllm', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_store_imports_numba_only_when_the_ans_stage_runs():
    """vLLM's engine start fails on llvmlite objects already in sys.modules (logitcache.store.jit): the
    store, the capture pipeline and the dataset import numba only once an ``ans`` unit is coded."""
    code = ("import sys, logitcache.store.reader, logitcache.store.writer, logitcache.capture.pipeline, "
            "logitcache.train.dataset; print(','.join(m for m in ('numba', 'llvmlite') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_hf_teacher_does_not_import_vllm(tiny_teacher):
    code = ("import sys; from logitcache.capture.config import TeacherConfig; from logitcache.capture.teachers import load_teacher; "
            f"load_teacher(TeacherConfig(model={tiny_teacher!r}, dtype='float32', device='cpu')); "
            "print(','.join(m for m in ('vllm', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", logitcache.__all__)
def test_public_names_resolve(name):
    assert getattr(logitcache, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        logitcache.nope  # noqa: B018


def job_configs():
    return sorted((ROOT / "jobs").rglob("*.yaml"))


def test_jobs_exist():
    assert job_configs(), "jobs/ holds no YAML config"


@pytest.mark.parametrize("path", job_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_job_config_validates(path):
    data = yaml.safe_load(path.read_text())
    kind = data.pop("kind", "capture")
    if kind == "capture":
        CaptureConfig.from_dict(data)
    else:
        from logitcache.train.loop import TrainConfig

        TrainConfig.from_dict(data)
