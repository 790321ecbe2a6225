"""Hugging Face transformers teacher: any local causal-LM directory, on CPU or one GPU.

The model is split into its *body* (the decoder whose ``last_hidden_state`` feeds the output
head) and its *head* (``get_output_embeddings()`` plus the architecture's logit post-processing,
:class:`~logitcache.capture.teachers.head.HeadPost`, shared with the vLLM backend).
The body runs once per batch; the head runs per sequence per chunk, so full-vocabulary logits
for a whole batch never exist and results do not depend on batch composition.

At load, a parity check compares ``model(x).logits`` with body + chunked head on a short input;
a head this module does not reproduce (an unknown post-processing step) is refused loudly
rather than allowed to write a wrong cache.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TeacherConfig
from ...choices import DTYPES
from ...errors import TeacherError
from .base import Generation, bucket_groups, check_input_ids, check_sequences, right_padded
from ...faults import fault_point
from ...models.compat import newer_transformers
from ...models.hashing import weights_sha256
from .head import HeadPost, head_chunks
from .sampling import StopRule, sample_token

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the dtype each DTYPES choice loads in
# Parity tolerance, relative to max(1, max |logit|): a few units in the last place of the dtype.
_PARITY_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
_PARITY_SHAPE = (2, 16)
_PARITY_CHUNK = 5


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise TeacherError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc


class HFTeacher:
    """A transformers causal LM as a :class:`~logitcache.capture.teachers.base.Teacher`.

    Build with :meth:`load` from a :class:`TeacherConfig`, or directly from a loaded model
    (keyword-only); either way the parity check runs before the teacher is usable.
    """

    backend = "hf"

    def __init__(self, *, model: nn.Module, tokenizer: Any, name: str, weights_sha256: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.weights_sha256 = weights_sha256
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        head = model.get_output_embeddings()
        if head is None:
            raise TeacherError(f"teacher {name!r} has no output embeddings (get_output_embeddings() is None)")
        self.head = head
        self.post = HeadPost.from_config(model.config)
        self.vocab_size = int(head.weight.shape[0])
        self.max_positions = _max_positions(model.config, tokenizer)
        self.eos_id = _eos_id(model.config, tokenizer, name)
        self.body = self._find_body()

    @classmethod
    def load(cls, config: TeacherConfig) -> HFTeacher:
        """Load ``config.model`` (a local directory or ``embedded:...``) on ``config.device``."""
        from ...models.embedded import resolve_teacher_path

        path = resolve_teacher_path(config.model)
        _check_model_dir(path, config)
        digest = weights_sha256(path)
        tokenizer, model = _load_pretrained(path, config, resolve_device(config.device))
        return cls(model=model, tokenizer=tokenizer, name=config.model, weights_sha256=digest)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights_sha256": self.weights_sha256,
            "vocab_size": self.vocab_size,
        }

    def forward_chunks(self, input_ids: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """See :meth:`Teacher.forward_chunks`. Validates before any compute."""
        ids = self._check_input(input_ids, chunk)
        return self._chunks(self.body, ids, chunk)

    def forward_sequences(self, sequences: Sequence[torch.Tensor], chunk: int
                          ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """See :meth:`Teacher.forward_sequences`: sequences of one length bucket run as one right-padded
        batch (:func:`~logitcache.capture.teachers.base.right_padded`). Validates before any compute."""
        seqs = check_sequences(sequences, chunk, name=self.name, max_positions=self.max_positions,
                               vocab_size=self.vocab_size)
        return self._sequence_chunks(self.body, seqs, chunk)

    def generate(self, prompts: Sequence[torch.Tensor], settings: Any, seeds: Sequence[int],
                 stop_ids: Sequence[int]) -> list[Generation]:
        """See :meth:`Teacher.generate`: one prompt at a time with a KV cache, under the rules of
        :mod:`~logitcache.capture.teachers.sampling`, each from its own ``torch.Generator`` seeded
        ``seeds[i]``; so a response depends on its prompt, settings and seed alone, never on the others."""
        prompts = check_sequences(prompts, 1, name=self.name, max_positions=self.max_positions,
                                  vocab_size=self.vocab_size)
        rule = StopRule(settings, stop_ids, self.tokenizer)
        return [self._generate_one(p, settings, seed, rule) for p, seed in zip(prompts, seeds, strict=True)]

    @torch.inference_mode()
    def _generate_one(self, prompt: torch.Tensor, settings: Any, seed: int, rule: StopRule) -> Generation:
        generator = torch.Generator().manual_seed(int(seed))
        output = self.body(input_ids=prompt.to(self.device)[None], use_cache=True)
        tokens: list[int] = []
        while True:
            _, logits = next(head_chunks(self.head, self.post, _last_hidden_state(output)[0, -1:], 1))
            tokens.append(sample_token(logits[0], settings, generator))
            fault_point("generate", f"{len(tokens)}")
            done = rule.finish(tokens)
            if done is not None:
                return done
            step = torch.tensor([[tokens[-1]]], dtype=torch.long, device=self.device)
            output = self.body(input_ids=step, past_key_values=output.past_key_values, use_cache=True)

    @torch.inference_mode()
    def bare_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``model(input_ids).logits`` ([B, L, V]): the benchmark baseline, forward without capture."""
        ids = self._check_input(input_ids, 1)
        return self.model(input_ids=ids, use_cache=False).logits

    def close(self) -> None:
        on_cuda = self.device.type == "cuda"
        for attr in ("model", "body", "head"):
            self.__dict__.pop(attr, None)
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    # -- internals -------------------------------------------------------------------------

    @torch.inference_mode()
    def _chunks(self, body: nn.Module, ids: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        hidden = _last_hidden_state(body(input_ids=ids, use_cache=False))
        for row in range(hidden.shape[0]):
            for start, logits in head_chunks(self.head, self.post, hidden[row], chunk):
                yield row, start, logits

    @torch.inference_mode()
    def _sequence_chunks(self, body: nn.Module, seqs: list[torch.Tensor], chunk: int
                         ) -> Iterator[tuple[int, int, torch.Tensor]]:
        for padded, rows in bucket_groups([s.numel() for s in seqs], self.max_positions):
            batch = right_padded([seqs[r] for r in rows], padded, self.device)
            hidden = _last_hidden_state(body(input_ids=batch, use_cache=False))
            for i, row in enumerate(rows):
                for start, logits in head_chunks(self.head, self.post, hidden[i, : seqs[row].numel()], chunk):
                    yield row, start, logits

    def _check_input(self, input_ids: Any, chunk: int) -> torch.Tensor:
        return check_input_ids(input_ids, chunk, name=self.name, max_positions=self.max_positions,
                               vocab_size=self.vocab_size).to(self.device)

    def _find_body(self) -> nn.Module:
        """The decoder whose last hidden state feeds the head, confirmed by the parity check."""
        candidates: list[nn.Module] = []
        for get in (self.model.get_decoder, lambda: getattr(self.model, "model", None), lambda: self.model.base_model):
            try:
                module = get()
            except (AttributeError, NotImplementedError, ValueError):
                continue
            if isinstance(module, nn.Module) and module is not self.model and all(module is not c for c in candidates):
                candidates.append(module)
        if not candidates:
            raise TeacherError(f"teacher {self.name!r}: cannot find its decoder (tried get_decoder(), .model)")
        return self._parity_check(candidates)

    @torch.inference_mode()
    def _parity_check(self, candidates: list[nn.Module]) -> nn.Module:
        length = min(_PARITY_SHAPE[1], self.max_positions)
        high = min(self.vocab_size, len(self.tokenizer)) if self.tokenizer is not None else self.vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(high, 1), (_PARITY_SHAPE[0], length), generator=gen).to(self.device)
        reference = self.model(input_ids=ids, use_cache=False).logits.float()
        tol = _PARITY_RTOL.get(self.dtype, 1e-4) * max(1.0, float(reference.abs().max()))
        deviations: list[str] = []
        for body in candidates:
            try:
                ours = self._dense(body, ids, _PARITY_CHUNK).float()
            except Exception as exc:  # a wrong candidate may not even run; try the next one
                deviations.append(f"{type(body).__name__} failed: {exc}")
                continue
            if ours.shape != reference.shape:
                deviations.append(f"{type(body).__name__} gave shape {tuple(ours.shape)}")
                continue
            deviation = float((ours - reference).abs().max())
            if deviation <= tol:
                return body
            deviations.append(f"{type(body).__name__}: max deviation {deviation:.4g}")
        raise TeacherError(
            f"teacher {self.name!r} ({type(self.model).__name__}): decoder + chunked output head does not "
            f"reproduce model(x).logits ({'; '.join(deviations)}; tolerance {tol:.3g}); its forward "
            f"post-processes logits in a way logitcache does not support, so it would write a wrong cache"
        )

    def _dense(self, body: nn.Module, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        rows: dict[int, list[torch.Tensor]] = {}
        for row, _, logits in self._chunks(body, ids, chunk):
            rows.setdefault(row, []).append(logits)
        return torch.stack([torch.cat(rows[r]) for r in sorted(rows)])


def _last_hidden_state(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def _max_positions(config: Any, tokenizer: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 1 << 30 else 1 << 30


def _eos_id(config: Any, tokenizer: Any, name: str) -> int:
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    raise TeacherError(f"teacher {name!r} defines no end-of-sequence token (tokenizer or config eos_token_id)")


def _check_model_dir(path: Path, config: TeacherConfig) -> None:
    expected = (
        "expected a local directory with config.json, weights (*.safetensors) and a tokenizer, as written by "
        "save_pretrained; hub downloads are not available, so download the model first and pass its directory"
    )
    if not path.exists():
        raise TeacherError(f"teacher {config.model!r}: {path} does not exist; {expected}")
    if not path.is_dir() or not (path / "config.json").is_file():
        kind = "a file" if path.is_file() else "a directory without config.json"
        raise TeacherError(f"teacher {config.model!r}: {path} is {kind}; {expected}")
    try:
        model_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TeacherError(f"teacher {config.model!r}: cannot read {path / 'config.json'}: {exc}") from exc
    if isinstance(model_config, dict) and "auto_map" in model_config and not config.trust_remote_code:
        raise TeacherError(
            f"teacher {config.model!r} needs its own Python code (config.json has auto_map); it runs only "
            f"with --trust-remote-code (TeacherConfig.trust_remote_code=True), and only if you trust its source"
        )
    why = newer_transformers(path)
    if why:
        raise TeacherError(f"teacher {config.model!r}: {why}")
    if not config.trust_remote_code and not any(_is_tokenizer_file(p.name) for p in path.iterdir()):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:12])
        raise TeacherError(
            f"teacher {config.model!r}: {path} holds no tokenizer (found {found}; expected tokenizer.json, "
            "tokenizer.model, vocab.json with merges.txt, vocab.txt or a *.tiktoken file). Save the teacher's "
            "tokenizer there (tokenizer.save_pretrained(path)), or copy the tokenizer files the model came with"
        )


def _is_tokenizer_file(name: str) -> bool:
    """A file transformers can build a tokenizer from (remote-code tokenizers may use others)."""
    return name in ("tokenizer.json", "vocab.json", "vocab.txt") or name.endswith((".model", ".tiktoken"))


def _load_pretrained(path: Path, config: TeacherConfig, device: torch.device) -> tuple[Any, nn.Module]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": config.trust_remote_code, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise TeacherError(f"teacher {config.model!r}: cannot load a tokenizer from {path}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=TORCH_DTYPES[config.dtype], device_map=str(device), **kwargs
        )
    except Exception as exc:
        raise TeacherError(f"teacher {config.model!r}: cannot load {path} as a causal LM: {exc}") from exc
    return tokenizer, model
