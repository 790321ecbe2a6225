"""Ray orchestration only: N teacher engines as Ray actors, each committing whole units.

The driver plans, opens the store (holding its lock) and finalises the manifest, exactly as a
one-process capture does (:func:`logitcache.capture.pipeline.run_capture`); only the execution of units
differs. Units — the planned sequences, ``sequences_per_shard`` at a time, each sent as its slice of the plan — go to a
``ray.util.ActorPool`` of :class:`CaptureWorker` actors, one per GPU (HF backend) or per
tensor/pipeline-parallel group (vLLM backend). Each worker computes and commits its units through
:func:`logitcache.capture.pipeline.capture_and_commit`, the store's exactly-once path, and returns the
commit records; the driver writes the manifest once every unit is in.

Fault tolerance is Ray's: a worker whose process dies is restarted (``max_restarts``) and the
unit it was running is retried (``max_task_retries``) on the restarted actor, wherever Ray places
it. A unit half-written by the dead process is simply recomputed (a shard without its commit
record does not count), and because a unit's bytes depend only on (window, seed, seq_id), the
store ends identical to a one-process run. A dead driver is a dead job: run the same command
again and it resumes from the committed units.

``ray`` is imported only inside these functions; ``import logitcache`` never loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .pipeline import CaptureSummary, capture_and_commit, preflight, run_capture
from .config import CaptureConfig
from ..errors import ConfigError
from .plan import Unit
from ..store.spec import ShardSpec
from ..store.commit import ShardRecord

MAX_RESTARTS = 3


@dataclass(frozen=True)
class TeacherFacts:
    """What the driver needs of the teacher (plan, manifest header) without loading its weights."""

    name: str
    vocab_size: int
    max_positions: int
    tokenizer: Any
    eos_id: int
    teacher_identity: dict

    def identity(self) -> dict[str, Any]:
        return dict(self.teacher_identity)


class CaptureWorker:
    """A Ray actor holding one teacher engine; ``run`` computes and commits one unit."""

    def __init__(self, config: dict[str, Any]) -> None:
        from .teachers import load_teacher

        self.config = CaptureConfig.from_dict(config)
        self.teacher = load_teacher(self.config.teacher)

    def facts(self) -> TeacherFacts:
        t = self.teacher
        return TeacherFacts(name=t.name, vocab_size=t.vocab_size, max_positions=t.max_positions,
                            tokenizer=t.tokenizer, eos_id=t.eos_id, teacher_identity=t.identity())

    def run(self, plan, spec: ShardSpec, root: str, unit: Unit) -> ShardRecord:
        return capture_and_commit(self.teacher, plan, unit, self.config, spec, root)

    def pid(self) -> int:
        return os.getpid()


def worker_resources(config: CaptureConfig, cluster_gpus: float) -> dict[str, float]:
    """Ray resources of one worker: a tensor x pipeline parallel group of GPUs for vLLM, one GPU for
    HF, or one CPU on a cluster without GPUs."""
    if cluster_gpus <= 0:
        return {"num_cpus": 1, "num_gpus": 0}
    engine = config.teacher.engine
    group = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    return {"num_cpus": 1, "num_gpus": group if config.teacher.backend == "vllm" else 1}


def worker_config(config: CaptureConfig) -> dict[str, Any]:
    """The config a worker loads: a vLLM group inside one actor runs its ranks as local processes
    (the actor already holds the group's GPUs; vLLM's Ray executor would ask Ray for more)."""
    data = config.to_dict()
    engine = data["teacher"]["engine"]
    if config.teacher.backend == "vllm" and int(engine.get("tensor_parallel_size", 1)) > 1:
        engine.setdefault("distributed_executor_backend", "mp")
    return data


def capture_distributed(config: CaptureConfig, *, overwrite: bool = False, progress: bool = True,
                        worker_env: dict[str, str] | None = None) -> CaptureSummary:
    """Capture ``config`` on ``config.workers`` Ray actors; same store as :func:`logitcache.capture.capture`.

    Connects to the Ray cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or starts a local one.
    ``worker_env`` adds environment variables to the workers' processes.
    """
    if config.workers < 1:
        raise ConfigError(f"distributed capture needs workers >= 1; found {config.workers}")
    corpus = preflight(config, overwrite=overwrite)  # before Ray starts the workers, each loading a teacher
    ray = _ray()
    if not ray.is_initialized():
        ray.init()
    resources = worker_resources(config, ray.cluster_resources().get("GPU", 0))
    actor = ray.remote(CaptureWorker).options(
        **resources, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
        runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
    )
    workers = [actor.remote(worker_config(config)) for _ in range(config.workers)]
    try:
        facts = ray.get([w.facts.remote() for w in workers])[0]  # every engine up before the clock starts

        def execute(plan, spec, root, todo, on_positions):
            from ray.util import ActorPool

            pool = ActorPool(workers)
            run = lambda w, u: w.run.remote(plan.slice(u), spec, str(root), u)  # noqa: E731
            for record in pool.map_unordered(run, todo):
                on_positions(record.positions)
                yield record

        return run_capture(config, facts, execute, overwrite=overwrite, progress=progress, corpus=corpus)
    finally:
        for w in workers:
            ray.kill(w)


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"--workers needs Ray ({exc}); install it with `pip install 'logitcache[ray]'`, "
                          "or capture in-process with --workers 0") from exc
    return ray
