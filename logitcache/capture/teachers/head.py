"""The output head shared by every teacher backend: projection + the architecture's post-processing.

A backend produces final hidden states (``[L, d]`` per sequence, after the final norm); the head
turns them into logits chunk by chunk on the teacher's device, so full-vocabulary logits for a
whole batch never exist. ``HeadPost`` reproduces the logit post-processing that transformers and
vLLM apply after the projection (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's
``final_logit_softcapping``); each backend proves at load time, with its own parity check, that
this head reproduces the engine's logits before it is allowed to write a cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import TeacherError


@dataclass(frozen=True)
class HeadPost:
    """Logit post-processing after the output projection, applied in this order when set."""

    logit_scale: float | None = None  # Cohere: logits * scale
    logits_scaling: float | None = None  # Granite: logits / scaling
    softcap: float | None = None  # Gemma 2/3: cap * tanh(logits / cap)

    @classmethod
    def from_config(cls, config: Any) -> HeadPost:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(
            logit_scale=_optional_float(text, "logit_scale"),
            logits_scaling=_optional_float(text, "logits_scaling"),
            softcap=_optional_float(text, "final_logit_softcapping"),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # Same operations in the same order as the transformers forwards, for bitwise parity.
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits


def _optional_float(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    return None if value is None else float(value)


def head_chunks(project: Callable[[torch.Tensor], torch.Tensor], post: HeadPost, hidden: torch.Tensor,
                chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, logits[c, V])`` for one sequence's hidden states ``[L, d]``, ``chunk`` positions at a time."""
    for start in range(0, hidden.shape[0], chunk):
        yield start, post.apply(project(hidden[start : start + chunk]))


@dataclass(frozen=True)
class OutputHead:
    """The output projection as plain tensors: ``logits = post(hidden @ weight.T + bias)``.

    ``weight: [V, d]`` and ``bias: [V]`` (or ``None``) live on the teacher's device in its dtype.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    post: HeadPost

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)

    def chunks(self, hidden: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        return head_chunks(self.project, self.post, hidden.to(self.weight.device), chunk)


# Names of the output projection in checkpoints, most specific first; the input embedding is
# used only when the config ties it to the output (tie_word_embeddings).
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "output.weight")
_TIED_KEYS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "language_model.model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")


def load_output_head(model_dir: Path, config: Any, *, device: torch.device, dtype: torch.dtype,
                     name: str) -> OutputHead:
    """Read only the output head's tensors from a safetensors checkpoint (any number of files)."""
    from safetensors import safe_open

    index = _tensor_index(model_dir, name)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    candidates = _HEAD_KEYS + (_TIED_KEYS if tied else ())
    key = next((k for k in candidates if k in index), None)
    if key is None:
        raise TeacherError(
            f"teacher {name!r}: cannot find the output head in {model_dir} (looked for "
            f"{', '.join(candidates)}; tie_word_embeddings={tied}); this architecture's head is not supported "
            f"by the vllm backend, use backend 'hf'"
        )
    bias_key = key.removesuffix(".weight") + ".bias" if key in _HEAD_KEYS else None
    tensors = {}
    for k in (key, bias_key):
        if k is not None and k in index:
            with safe_open(str(model_dir / index[k]), framework="pt", device="cpu") as f:
                tensors[k] = f.get_tensor(k).to(device=device, dtype=dtype)
    return OutputHead(weight=tensors[key], bias=tensors.get(bias_key), post=HeadPost.from_config(config))


def _tensor_index(model_dir: Path, name: str) -> dict[str, str]:
    """Tensor name → safetensors file name, from the sharded index or the single file."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        return dict(json.loads(index_file.read_text())["weight_map"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TeacherError(f"teacher {name!r}: no *.safetensors in {model_dir}; the vllm backend reads the "
                           "output head from safetensors weights")
    from safetensors import safe_open

    index = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            index.update({k: path.name for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return index
