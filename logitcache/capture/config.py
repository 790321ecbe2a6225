"""Frozen configuration dataclasses for capture, with dict round trips and validation.

``CaptureConfig.identity()`` is the part of the configuration that determines the bytes of a
store: a resumed capture must match it field by field. Batch size, device and the output path
are left out on purpose: they change speed, never results; the corpus path too, because the
corpus is identified by its content (the manifest's ``corpus.fingerprint``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from ..models.embedded import EMBEDDED_TEACHER
from ..choices import (ALLOCATIONS, BACKENDS, COMPRESSIONS, DTYPES, ENTROPY_CODECS, FORMATS, ID_CHOICES, LAYOUTS,
                       LOGPROB_DTYPES, LONG_SEQUENCES, METHODS, TRAIN_ON)
from ..jobfile import from_mapping
from ..store.totals import adaptive_cap

BUILTIN_CORPUS = "builtin:pydoc"


def _or(values: tuple[str, ...], quote: bool = False) -> str:
    """``("a", "b", "c")`` → ``"a, b or c"`` (``'a' or 'b'`` with ``quote``), for messages."""
    names = [repr(v) if quote else v for v in values]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class SparsifyConfig:
    """How each position's distribution is summarised.

    ``k`` is the head size (topk, hybrid); ``samples`` the draws N (sample, hybrid);
    ``temperature`` τ shapes the sampling proposal q ∝ p^(1/τ) (sample only). ``allocation`` (sample,
    hybrid): ``fixed`` gives every position N draws; ``variance`` gives each sequence N draws per position on
    average, each position ``N_t ∝ sqrt(1 − Σp²)`` of them (hybrid: of its tail), between 1 and
    :attr:`max_samples` (:mod:`logitcache.capture.budget`).
    """

    method: str = "sample"
    k: int = 64
    samples: int = 50
    temperature: float = 1.0
    allocation: str = "fixed"

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}; found {self.method!r}")
        _check(isinstance(self.k, int) and self.k >= 1, f"k must be an integer >= 1; found {self.k!r}")
        _check(
            isinstance(self.samples, int) and 1 <= self.samples <= 65535,
            f"samples must be an integer in [1, 65535]; found {self.samples!r}",
        )
        _check(self.temperature > 0, f"temperature must be > 0; found {self.temperature!r}")
        _check(
            self.method == "sample" or self.temperature == 1.0,
            f"temperature applies to method 'sample' only; found temperature={self.temperature} "
            f"with method {self.method!r} (hybrid samples the tail at τ=1)",
        )
        _check(self.allocation in ALLOCATIONS, f"allocation must be {_or(ALLOCATIONS)}; found {self.allocation!r}")
        _check(self.allocation == "fixed" or self.method in ("sample", "hybrid"),
               f"allocation {self.allocation!r} spreads sample draws; method {self.method!r} draws none (use "
               "method sample or hybrid, or allocation fixed)")
        _check(self.allocation == "fixed" or self.temperature == 1.0,
               f"allocation {self.allocation!r} samples at temperature 1 (its budget is the variance of the count "
               f"estimator, not of the importance-weighted one); found temperature={self.temperature}. Use one of "
               "the two.")

    @property
    def max_samples(self) -> int:
        """The most draws one position gets: N (fixed), or the adaptive cap
        (:func:`~logitcache.store.totals.adaptive_cap`: 4·N within the count's byte width)."""
        return self.samples if self.allocation == "fixed" else adaptive_cap(self.samples)

    def params(self) -> dict[str, Any]:
        """Only the parameters the method uses (what the manifest records); ``allocation`` only when not fixed,
        so fixed-budget stores keep their identity."""
        adaptive = {} if self.allocation == "fixed" else {"allocation": self.allocation}
        if self.method == "topk":
            return {"k": self.k}
        if self.method == "sample":
            return {"samples": self.samples, "temperature": self.temperature, **adaptive}
        if self.method == "hybrid":
            return {"k": self.k, "samples": self.samples, **adaptive}
        return {}


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher runs, and how. ``model`` is a local HF directory or ``embedded:...``.

    ``backend`` is ``hf`` (transformers) or ``vllm``; ``engine`` holds keyword arguments passed
    through to ``vllm.LLM`` (``tensor_parallel_size``, ``max_model_len``, ``gpu_memory_utilization``,
    ``enforce_eager``, ...), vllm backend only. ``device`` is where the output head runs.
    """

    model: str = EMBEDDED_TEACHER
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    head_chunk: int = 256
    engine: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}; found {self.backend!r}")
        _check(isinstance(self.engine, dict), f"engine must be a mapping of vllm.LLM arguments; found {self.engine!r}")
        _check(self.backend == "vllm" or not self.engine,
               f"engine arguments apply to backend 'vllm' only; found {sorted(self.engine)} with backend {self.backend!r}")
        reserved = sorted(set(self.engine) & {"model", "dtype", "runner", "convert", "pooler_config", "tokenizer"})
        _check(not reserved, f"engine may not set {reserved}: logitcache sets them (use teacher.model / teacher.dtype)")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; found {self.dtype!r}")
        _check(self.head_chunk >= 1, f"head_chunk must be >= 1; found {self.head_chunk!r}")


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how it becomes sequences (docs/capture.md, "Layouts").

    ``layout``: ``packed`` cuts one EOS-joined token stream into windows of ``seq_len + 1`` tokens;
    ``documents`` makes each document or conversation one sequence of at most ``seq_len + 1`` tokens
    (``long_sequences`` says what happens to a longer one); ``auto`` is ``documents`` for a chat corpus and
    ``packed`` for text. ``train_on`` (chat only; default ``assistant``): which tokens train, see
    :mod:`logitcache.capture.chat`. ``chat_template``: a Jinja template file used instead of the tokenizer's.
    """

    source: str = BUILTIN_CORPUS
    text_field: str = "text"
    split: str = "train"
    seq_len: int = 512
    max_tokens: int | None = None
    layout: str = "auto"
    long_sequences: str = "truncate"
    train_on: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        _check(self.seq_len >= 1, f"seq_len must be >= 1; found {self.seq_len!r}")
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            f"max_tokens must be >= 1 or unset; found {self.max_tokens!r}",
        )
        _check(self.layout in LAYOUTS, f"layout must be {_or(LAYOUTS)}; found {self.layout!r}")
        _check(self.long_sequences in LONG_SEQUENCES,
               f"long_sequences must be {_or(LONG_SEQUENCES)}; found {self.long_sequences!r}")
        _check(self.train_on is None or self.train_on in TRAIN_ON,
               f"train_on must be {_or(TRAIN_ON)} or unset; found {self.train_on!r}")
        _check(self.layout != "packed" or self.train_on in (None, "all"),
               f"train_on {self.train_on!r} needs the documents layout (a packed window trains every position); "
               "use --layout documents")
        _check(self.layout != "packed" or self.chat_template is None,
               "chat_template applies to chat corpora, which use the documents layout; drop --layout packed")


@dataclass(frozen=True)
class GenerateConfig:
    """Teacher-generated responses (docs/capture.md, "Teacher-generated responses"); ``max_new_tokens`` = 0: off.

    Each prompt of a chat corpus (the conversation up to its last user turn, with the template's generation
    prompt) gets ``n`` responses of at most ``max_new_tokens`` tokens, sampled at ``temperature`` (0: greedy)
    within the ``top_k`` most likely tokens (0: all) and the ``top_p`` nucleus, stopping at the teacher's eos
    token or at one of the ``stop`` strings. The targets are then captured over prompt + response at τ = 1.
    """

    max_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
               f"generate.max_new_tokens must be an integer >= 0 (0 = no generation); found {self.max_new_tokens!r}")
        _check(isinstance(self.n, int) and self.n >= 1,
               f"generate.n (responses per prompt) must be an integer >= 1; found {self.n!r}")
        _check(isinstance(self.temperature, (int, float)) and self.temperature >= 0,
               f"generate.temperature must be >= 0 (0 = greedy); found {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"generate.top_p must be in (0, 1] (1 = no nucleus cut); found {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"generate.top_k must be an integer >= 0 (0 = no cut); found {self.top_k!r}")
        stop = self.stop if isinstance(self.stop, (list, tuple)) else None
        _check(stop is not None and all(isinstance(s, str) and s for s in stop) and len(stop) <= 250,
               f"generate.stop must be a list of at most 250 non-empty strings; found {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        _check(self.enabled or (self.temperature, self.top_p, self.top_k, self.n, self.stop) == (1.0, 1.0, 0, 1, ()),
               "generate settings were given but generate.max_new_tokens is 0 (generation off); set "
               "--generate-max-new-tokens N to generate responses, or drop the other generate settings")

    @property
    def enabled(self) -> bool:
        return self.max_new_tokens > 0

    def to_dict(self) -> dict[str, Any]:
        """The settings as the manifest and the identity record them (``stop`` as a list)."""
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class StoreConfig:
    """Where and how targets are written (docs/format.md).

    ``path`` is a directory or an fsspec URL (``s3://bucket/prefix``); ``format`` the container
    (``arrow`` or ``zarr``); ``ids`` the id code (``auto`` = ``rank-delta``, the smaller on measured
    SmolLM2 targets for every method; ``packed`` is fixed-width); ``logprob_dtype``
    ``float32`` (lossless), or lossy ``float16`` / ``q8`` (opt-in; error recorded per unit);
    ``label_logprobs`` also keeps the teacher's exact log-probability of every position's realized next
    token (a ``label_logprob`` row column, 4 bytes a position before compression; what cross-tokenizer
    merges need, docs/cross_tokenizer.md).
    """

    path: str = "cache"
    format: str = "arrow"
    sequences_per_shard: int = 16
    compression: str = "zstd"
    compression_level: int = 9
    logprob_dtype: str = "float32"
    ids: str = "auto"
    entropy: str = "zstd"
    label_logprobs: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.label_logprobs, bool), f"label_logprobs must be true or false; found "
               f"{self.label_logprobs!r}")
        _check(self.entropy in ENTROPY_CODECS, f"entropy must be {_or(ENTROPY_CODECS)}; found {self.entropy!r}")
        _check(self.format in FORMATS, f"format must be {_or(FORMATS, quote=True)}; found {self.format!r}")
        _check(self.ids in ID_CHOICES, f"ids must be {_or(ID_CHOICES)}; found {self.ids!r}")
        _check(isinstance(self.compression_level, int) and 1 <= self.compression_level <= 22,
               f"compression_level must be an integer in [1, 22]; found {self.compression_level!r}")
        _check(self.sequences_per_shard >= 1, f"sequences_per_shard must be >= 1; found {self.sequences_per_shard}")
        _check(
            self.compression in COMPRESSIONS,
            f"compression must be {_or(COMPRESSIONS)}; found {self.compression!r}",
        )
        _check(
            self.logprob_dtype in LOGPROB_DTYPES,
            f"logprob_dtype must be {_or(LOGPROB_DTYPES)} (lossy: opt-in); found {self.logprob_dtype!r}",
        )


@dataclass(frozen=True)
class CaptureConfig:
    """Everything a capture needs. ``batch_tokens`` bounds a forward batch (speed only).

    ``workers`` = 0 captures in this process; ``workers`` = N >= 1 runs N teacher engines as Ray
    actors (see :mod:`logitcache.capture.distributed`). ``encode_threads`` threads encode and commit finished
    units while the teacher computes the next (0 = auto: 1 for a CPU teacher, up to 4 beside a GPU).
    None of the three changes a byte of the store.
    """

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    seed: int = 0
    batch_tokens: int = 4096
    workers: int = 0
    encode_threads: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.encode_threads, int) and self.encode_threads >= 0,
               f"encode_threads must be an integer >= 0 (0 = auto); found {self.encode_threads!r}")
        _check(isinstance(self.workers, int) and self.workers >= 0,
               f"workers must be an integer >= 0 (0 = in-process, N = N Ray actors); found {self.workers!r}")
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0; found {self.seed!r}")
        _check(self.batch_tokens >= 1, f"batch_tokens must be >= 1; found {self.batch_tokens!r}")
        from ..store.entropy import MAX_SAMPLES

        _check(self.store.entropy != "ans" or self.sparsify.method not in ("sample", "hybrid")
               or self.sparsify.max_samples <= MAX_SAMPLES,
               f"the ans entropy stage codes up to {MAX_SAMPLES} draws per position; found "
               f"samples={self.sparsify.samples} (at most {self.sparsify.max_samples} a position). Use entropy "
               "zstd for more.")
        if self.generate.enabled:
            self._check_generation()

    def _check_generation(self) -> None:
        c, g = self.corpus, self.generate
        _check(g.max_new_tokens < c.seq_len,
               f"generate.max_new_tokens = {g.max_new_tokens} leaves no room for a prompt in seq_len = {c.seq_len} "
               f"(a sequence holds at most seq_len + 1 tokens, prompt + response, and a prompt at least 2); use "
               f"--generate-max-new-tokens at most {c.seq_len - 1} or a larger --seq-len")
        _check(c.layout != "packed", "generation writes one sequence per prompt and response (the documents layout); "
               "drop --layout packed")
        _check(c.train_on is None, f"train_on {c.train_on!r} does not apply to generated responses: the response "
               "(and its end-of-turn token) is what trains; drop --train-on")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["generate"] = self.generate.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptureConfig:
        return from_mapping(cls, data, nested=_NESTED)

    def with_overrides(self, overrides: dict[str, Any]) -> CaptureConfig:
        """Apply dotted overrides such as ``{"sparsify.k": 12}``; ``None`` values are ignored."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return CaptureConfig.from_dict(data)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the store's bytes (compared on resume).

        The corpus enters by content, not by name: the manifest's ``corpus.fingerprint`` (a hash of every
        document read) is compared on resume, so ``./a.txt``, its absolute path or a copy elsewhere resume
        the same store. (Stores written before this recorded ``corpus.source`` here; a resume ignores it.)
        The layout fields enter as resolved (``auto`` made ``packed`` or ``documents``, the chat template by
        its sha256) through the manifest's ``corpus.layout``, compared on resume like the fingerprint.
        ``generate`` enters only when generation is on, and ``store.label_logprobs`` only when it is true, so
        stores captured without them keep their identity.
        """
        d = self.to_dict()
        # head_chunk is here because the head's matmul shape can change float rounding in the last bit
        teacher = {k: d["teacher"][k] for k in ("model", "backend", "dtype", "head_chunk")}
        store = {k: v for k, v in d["store"].items() if k != "path" and (k != "label_logprobs" or v)}
        return {
            "teacher": teacher,
            "corpus": {k: v for k, v in d["corpus"].items() if k not in _NOT_IN_IDENTITY},
            "sparsify": {"method": self.sparsify.method, **self.sparsify.params()},
            "store": store,
            "seed": self.seed,
            **({"generate": self.generate.to_dict()} if self.generate.enabled else {}),
        }


# the corpus fields compared through the manifest's corpus section instead (see CaptureConfig.identity)
_NOT_IN_IDENTITY = ("source", "layout", "long_sequences", "train_on", "chat_template")

_NESTED = {
    (CaptureConfig, "teacher"): TeacherConfig,
    (CaptureConfig, "corpus"): CorpusConfig,
    (CaptureConfig, "sparsify"): SparsifyConfig,
    (CaptureConfig, "store"): StoreConfig,
    (CaptureConfig, "generate"): GenerateConfig,
}

__all__ = [
    "BUILTIN_CORPUS",
    "EMBEDDED_TEACHER",
    "CaptureConfig",
    "CorpusConfig",
    "GenerateConfig",
    "SparsifyConfig",
    "StoreConfig",
    "TeacherConfig",
    "replace",
]
