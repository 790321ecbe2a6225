"""CLI and config surface of the vLLM backend and Ray capture (no engine is started here)."""

from __future__ import annotations

import pytest

from logitcache.cli import load_config
from logitcache.capture.config import CaptureConfig, TeacherConfig
from logitcache.errors import ConfigError


def test_backend_workers_and_engine_flags():
    config = load_config(None, {"backend": "vllm", "workers": 2,
                                "engine": ("tensor_parallel_size=8", "enforce_eager=true", "gpu_memory_utilization=0.85")})
    assert config.teacher.backend == "vllm" and config.workers == 2
    assert config.teacher.engine == {"tensor_parallel_size": 8, "enforce_eager": True, "gpu_memory_utilization": 0.85}


def test_engine_and_workers_leave_the_store_identity_alone():
    a = CaptureConfig().with_overrides({"teacher.backend": "vllm"})
    b = a.with_overrides({"workers": 4, "teacher.engine.tensor_parallel_size": 2})
    assert a.identity() == b.identity()
    assert a.identity()["teacher"]["backend"] == "vllm"


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "tgi"}, "backend must be one of hf, vllm; found 'tgi'"),
    ({"engine": {"tensor_parallel_size": 2}}, "engine arguments apply to backend 'vllm' only"),
    ({"backend": "vllm", "engine": {"dtype": "half"}}, r"engine may not set \['dtype'\]"),
])
def test_bad_teacher_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TeacherConfig(**kwargs)


def test_encode_threads_flag_auto_and_identity():
    from logitcache.capture.pipeline import encode_threads

    config = load_config(None, {"encode_threads": 3, "device": "cpu"})
    assert config.encode_threads == 3 and encode_threads(config) == 3
    auto = config.with_overrides({"encode_threads": 0})
    assert encode_threads(auto) == 1  # a CPU teacher keeps the cores
    assert config.identity() == auto.identity()
    with pytest.raises(ConfigError, match="encode_threads must be an integer >= 0"):
        CaptureConfig(encode_threads=-2)


def test_bad_engine_flag_and_workers_are_refused():
    import click

    with pytest.raises(click.BadParameter, match="expected KEY=VALUE"):
        load_config(None, {"backend": "vllm", "engine": ("tensor_parallel_size",)})
    with pytest.raises(ConfigError, match="workers must be an integer >= 0"):
        CaptureConfig(workers=-1)


def test_a_plan_slice_reads_like_the_plan(tiny_tokenizer):
    from logitcache.capture.corpus import Document
    from logitcache.capture.plan import PlanSlice
    from logitcache.capture.plan import build_plan, plan_units

    docs = [Document(text=f"document number {i} " * 7, origin=str(i)) for i in range(9)]
    plan = build_plan(docs, tiny_tokenizer, seq_len=8, max_tokens=None, eos_id=0, max_positions=256)
    for unit in plan_units(plan, 3):
        part = PlanSlice.of(plan, unit)
        assert (part.windows(unit.start, unit.stop) == plan.windows(unit.start, unit.stop)).all()
        assert [part.seq_id(i) for i in range(unit.start, unit.stop)] == \
            [plan.seq_id(i) for i in range(unit.start, unit.stop)]
        assert part.tokens.size == unit.size * 8 + 1
