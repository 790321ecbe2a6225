"""Issue #7 fault matrix, full size: SIGKILL a capture at 20 seeded random points spread over the teacher
forward, shard writes, the gap between a shard and its commit record, and the manifest update; resume;
the store must be byte-identical to an uninterrupted run, nothing lost or duplicated. Plus external
SIGKILLs at random times. (Light subset in the default suite: tests/unit/test_faults.py.)"""

from __future__ import annotations

import random

import pytest

from logitcache.testing.crash import CATEGORIES, choose_events, crash_trial, job_args, traced_run

SEQ_LEN, PER_SHARD, UNITS = 32, 2, 8
QUOTA = {"teacher forward": 6, "shard mid-write": 5, "between shard and commit": 5, "manifest update": 4}
SEED = 2026


def matrix_config(teacher, out):
    from logitcache.capture.config import CaptureConfig

    return CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "teacher.head_chunk": 16,
        "corpus.seq_len": SEQ_LEN, "corpus.max_tokens": SEQ_LEN * PER_SHARD * UNITS, "store.path": str(out),
        "store.sequences_per_shard": PER_SHARD, "sparsify.method": "hybrid", "sparsify.k": 5,
        "sparsify.samples": 20, "batch_tokens": 2 * (SEQ_LEN + 1)})


@pytest.fixture(scope="module")
def traced(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    config = matrix_config(tiny_teacher, root / "ref")
    events = traced_run(job_args(config, root / "ref.yaml"), root / "trace.txt")
    return config, events, choose_events(events, QUOTA, SEED)


def test_twenty_points_cover_every_category(traced):
    _, _, chosen = traced
    assert len(chosen) == 20 == len(set(chosen))
    assert {c: sum(e.category == c for e in chosen) for c in CATEGORIES} == QUOTA


@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_random_point_then_resume(traced, tmp_path, trial):
    config, _, chosen = traced
    event = chosen[trial]
    outcome = crash_trial(config, tmp_path / "s", tmp_path / "j.yaml", spec=event.spec)
    print(event.category, event.detail, outcome)
    assert outcome.killed and outcome.recorded_sound, outcome
    assert outcome.identical and (outcome.lost, outcome.duplicated) == (0, 0), outcome


@pytest.mark.parametrize("trial", range(5))
def test_external_sigkill_at_random_time_then_resume(traced, tmp_path, trial):
    config, events, _ = traced
    after = random.Random(SEED + trial).randrange(1, len(events))
    outcome = crash_trial(config, tmp_path / "s", tmp_path / "j.yaml", after_events=after)
    print(outcome)
    assert outcome.recorded_sound and outcome.identical and (outcome.lost, outcome.duplicated) == (0, 0), outcome


# --- Ray: 2-worker capture with a worker killed -----------------------------------------------------
# Lives in tests/integration/test_ray_capture.py::test_a_killed_worker_is_replaced_and_the_store_is_identical
# (one of two workers SIGKILLs itself at unit_start, teacher_chunk, mid_write, after_shard or after_commit;
# Ray restarts it and retries its unit; the store equals the one-process reference byte for byte) and
# ::test_a_dead_job_resumes_on_ray (the whole job killed, resumed with 2 workers).
