"""Teacher backends (stage 2, "teach"): a batch of windows in, logits chunk by chunk out, on device.

``HFTeacher`` runs any local transformers causal LM; ``ensure_embedded_teacher`` fetches and
converts the default SmolLM2-135M-Instruct teacher once; ``VLLMTeacher`` (``teachers.vllm``) runs
vLLM for hidden states and applies the shared output head. transformers and vllm are imported only
when a teacher is loaded or converted.
"""

from ...models.home import logitcache_home
from .base import Teacher
from ...models.embedded import ensure_embedded_teacher, resolve_teacher_path
from ...models.hashing import weights_sha256
from .hf import HFTeacher


def load_teacher(config) -> Teacher:
    """Load the teacher a :class:`~logitcache.capture.config.TeacherConfig` names, with its backend (hf or vllm)."""
    if config.backend == "vllm":
        from .vllm import VLLMTeacher  # imports vllm only when this backend is used

        return VLLMTeacher.load(config)
    return HFTeacher.load(config)


__all__ = [
    "HFTeacher",
    "Teacher",
    "ensure_embedded_teacher",
    "load_teacher",
    "logitcache_home",
    "resolve_teacher_path",
    "weights_sha256",
]
