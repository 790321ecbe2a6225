"""A plain distillation loop over a store: :class:`TrainConfig`, :func:`make_student`, :func:`train`.

``train(config)`` streams ``config.store`` with :class:`~logitcache.train.dataset.CacheDataset`, optimises
``kd_loss`` with AdamW and writes into ``config.out``:

* the student (``save_pretrained``; the source tokenizer too when it has one),
* ``optimizer.pt`` (AdamW state, ``torch.save``; loaded with ``weights_only=True``),
* ``train_state.json`` (step, the dataset's ``state_dict(batches_consumed=...)``, the config, metrics).

Running the same command again resumes from ``train_state.json``: the student and optimizer are
reloaded from ``out`` and the dataset continues exactly where it stopped (same ``batch_size``);
raising ``steps`` extends a finished run. ``train_state.json`` is written last (atomically), so it
never points to a step whose weights were not saved.

The loop is single-process; see ``docs/training.md`` for DDP and the HF ``Trainer``
(:class:`logitcache.train.hf_trainer.KDTrainer`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..choices import DTYPES, LOSS_IMPLS, LOSS_KINDS
from ..jobfile import from_mapping
from ..errors import ConfigError
from .loop_checkpoint import OPTIMIZER_FILE, evaluate, load_state, save_checkpoint

__all__ = ["TrainConfig", "evaluate", "make_student", "train"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class TrainConfig:
    """A distillation run.

    ``student`` is a local HF causal-LM directory, or ``init:<teacher>:<layers>``: the teacher's
    architecture and weights with only its first ``layers`` decoder layers (``<teacher>`` is a
    directory or ``embedded:smollm2-135m-instruct``; split on the last colon). ``kind`` is the loss
    kind of :func:`logitcache.kd_loss`, ``loss_impl`` its student side (``compiled``: torch.compile,
    docs/training.md "A compiled loss"). ``eval_every`` ≤ 0 evaluates only at the end; ``grad_clip``
    ≤ 0 disables clipping. ``padding_free`` trains on packed rows (each step's ``batch_size`` sequences
    in one row ``[1, total]``, :func:`logitcache.train.packing.pack`) instead of padded ``[B, T]`` batches;
    a run may switch between the two on resume (a step consumes the same sequences either way).
    ``student_tokenizer`` (a tokenizer directory or ``tokenizer.json``) trains a student with another
    tokenizer than the store's (docs/cross_tokenizer.md): batches in its tokens, ``cross_tokenizer_kd_loss``;
    the teacher's tokenizer is ``teacher_tokenizer``, else the one of the teacher the store's manifest names.
    """

    store: str
    student: str
    out: str
    eval_store: str | None = None
    alpha: float = 0.5
    kind: str = "auto"
    loss_impl: str = "plain"
    lr: float = 3e-4
    batch_size: int = 8
    steps: int = 100
    eval_every: int = 50
    seed: int = 0
    num_workers: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    grad_clip: float = 1.0
    padding_free: bool = False
    student_tokenizer: str | None = None
    teacher_tokenizer: str | None = None

    def __post_init__(self) -> None:
        for name in ("store", "student", "out"):
            value = getattr(self, name)
            _check(isinstance(value, str) and value != "", f"{name} must be a non-empty string; found {value!r}")
        if self.student.startswith("init:"):
            _split_init_spec(self.student)
        _check(self.eval_store is None or isinstance(self.eval_store, str),
               f"eval_store must be a path or unset; found {self.eval_store!r}")
        _check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0,
               f"alpha must be in [0, 1]; found {self.alpha!r}")
        _check(self.kind in LOSS_KINDS, f"kind must be one of {', '.join(LOSS_KINDS)}; found {self.kind!r}")
        _check(self.loss_impl in LOSS_IMPLS,
               f"loss_impl must be one of {', '.join(LOSS_IMPLS)}; found {self.loss_impl!r}")
        _check(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0; found {self.lr!r}")
        for name, low in (("batch_size", 1), ("steps", 0), ("seed", 0), ("num_workers", 0)):
            _check(_is_int(getattr(self, name), low), f"{name} must be an integer >= {low}; found {getattr(self, name)!r}")
        _check(isinstance(self.eval_every, int), f"eval_every must be an integer; found {self.eval_every!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; found {self.dtype!r}")
        _check(isinstance(self.grad_clip, (int, float)), f"grad_clip must be a number; found {self.grad_clip!r}")
        _check(isinstance(self.padding_free, bool), f"padding_free must be true or false; found {self.padding_free!r}")
        self._check_cross_tokenizer()

    def _check_cross_tokenizer(self) -> None:
        for name in ("student_tokenizer", "teacher_tokenizer"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value != ""),
                   f"{name} must be a path or unset; found {value!r}")
        if self.student_tokenizer is None:
            _check(self.teacher_tokenizer is None, f"teacher_tokenizer {self.teacher_tokenizer!r} is only used with "
                                                   "student_tokenizer (cross-tokenizer mode); set both or neither")
            return
        _check(not self.padding_free, "padding_free: cross-tokenizer batches are padded [B, T] in the student's "
                                      "tokens (packed student rows are not supported); drop --padding-free")
        _check(self.kind == "auto", f"kind {self.kind!r}: the cross-tokenizer loss is its own (exact-match KL + ULD); "
                                    "leave kind at auto with student_tokenizer")
        _check(self.loss_impl == "plain", f"loss_impl {self.loss_impl!r}: the cross-tokenizer loss has no compiled "
                                          "form; leave loss_impl at plain with student_tokenizer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate and build; unknown keys are refused with a hint. A job marker ``kind: train`` is
        dropped (``train`` is no loss kind), so a job file may carry it."""
        if isinstance(data, dict) and data.get("kind") == "train":
            data = {k: v for k, v in data.items() if k != "kind"}
        if isinstance(data, dict):
            missing = [f.name for f in fields(cls) if f.name in ("store", "student", "out") and f.name not in data]
            _check(not missing, f"missing config key(s) {', '.join(map(repr, missing))}; a train config needs "
                                "store, student and out")
        return from_mapping(cls, data)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` applied; ``None`` values are ignored."""
        return TrainConfig.from_dict({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})


# -- the student ------------------------------------------------------------------------------

def _split_init_spec(spec: str) -> tuple[str, int]:
    """``init:<teacher>:<layers>`` → ``(teacher, layers)``; the teacher may itself contain colons."""
    body = spec[len("init:"):]
    teacher, sep, layers = body.rpartition(":")
    _check(bool(sep) and teacher != "" and layers.isdigit() and int(layers) >= 1,
           f"student {spec!r}: expected init:<teacher>:<layers> with layers an integer >= 1, "
           "e.g. init:embedded:smollm2-135m-instruct:6")
    return teacher, int(layers)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def make_student(spec: str, dtype: str | torch.dtype = "float32"):
    """Load the student ``spec`` names (see :class:`TrainConfig`): a HF directory, or
    ``init:<teacher>:<layers>`` — the teacher with its decoder truncated to the first ``layers``
    layers (weights copied; embeddings, final norm and LM head kept)."""
    from transformers import AutoModelForCausalLM

    from ..models.compat import newer_transformers

    dtype = _torch_dtype(dtype)
    source = _student_source(spec)
    _check_student_dir(spec, source)
    why = newer_transformers(source)
    if why:
        raise ConfigError(f"student {spec!r}: {why}")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"student {spec!r}: cannot load {source} as a causal LM: {exc}") from exc
    if not spec.startswith("init:"):
        return model
    layers = _split_init_spec(spec)[1]
    decoder = model.get_decoder()
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ConfigError(f"student {spec!r}: cannot find the decoder layers of {type(model).__name__} "
                          "(expected model.get_decoder().layers)")
    if layers > len(blocks):
        raise ConfigError(f"student {spec!r}: the teacher has {len(blocks)} decoder layers; found layers={layers}")
    decoder.layers = torch.nn.ModuleList(list(blocks)[:layers])
    model.config.num_hidden_layers = layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def _student_source(spec: str) -> Path:
    if spec.startswith("init:"):
        from ..models.embedded import resolve_teacher_path

        return resolve_teacher_path(_split_init_spec(spec)[0])
    return Path(spec).expanduser()


def _check_student_dir(spec: str, source: Path) -> None:
    """Refuse a student that is no local model directory, saying what was found (transformers would try the hub)."""
    expected = ("expected a local Hugging Face model directory (config.json and weights, as save_pretrained writes "
                "them) or init:<teacher>:<layers>; models are not downloaded: download it first and pass its directory")
    if not source.is_dir():
        raise ConfigError(f"student {spec!r}: {source} {'is a file' if source.exists() else 'does not exist'}; {expected}")
    if not (source / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in source.iterdir())[:12]) or "nothing"
        raise ConfigError(f"student {spec!r}: {source} holds no config.json (found {found}); {expected}")


def _student_fingerprints(spec: str) -> tuple[str, ...] | None:
    """The forms of the student tokenizer's fingerprint (:func:`~logitcache.models.tokenizers.tokenizer_fingerprints`),
    or None when the student ships none."""
    from ..models.tokenizers import tokenizer_fingerprints

    try:
        from transformers import AutoTokenizer

        return tokenizer_fingerprints(AutoTokenizer.from_pretrained(_student_source(spec)))
    except (OSError, ValueError):
        return None


# -- the loop ---------------------------------------------------------------------------------

class _Run:
    """Mutable progress of one :func:`train` call."""

    def __init__(self, state: dict[str, Any] | None) -> None:
        self.step = state["step"] if state else 0
        self.losses: list[float] = []
        self.evals: list[dict[str, Any]] = list(state.get("evals", [])) if state else []
        self.tokens, self.seconds = 0, 0.0
        self.batches = 0  # batches taken since the dataset's last load_state_dict / set_epoch


def _setup(config: TrainConfig, state: dict[str, Any] | None):
    from .dataset import CacheDataset

    torch.manual_seed(config.seed + (state["step"] if state else 0))
    source = config.out if state else config.student
    model = make_student(source, config.dtype).to(config.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    transform = _transform(config)
    ds = CacheDataset(config.store, shuffle=True, seed=config.seed, batch_size=config.batch_size,
                      tokenizer_fingerprint=transform.teacher_fingerprints if transform is not None
                      else _student_fingerprints(config.student))
    if state:
        optimizer.load_state_dict(torch.load(Path(config.out) / OPTIMIZER_FILE, weights_only=True))
        ds.load_state_dict(state["dataset"])
    return model, optimizer, ds, transform


def _transform(config: TrainConfig):
    """A cross-tokenizer run's :class:`~logitcache.train.cross_tokenizer.CrossTokenizerTransform` (None for an
    ordinary run); a tokenizer the student ships must be ``student_tokenizer``."""
    if config.student_tokenizer is None:
        return None
    from ..models.tokenizers import tokenizer_fingerprint
    from .cross_tokenizer import CrossTokenizerTransform

    transform = CrossTokenizerTransform.for_store(config.store, config.student_tokenizer, config.teacher_tokenizer)
    shipped, given = _student_fingerprints(config.student), tokenizer_fingerprint(transform.student_tokenizer)
    if shipped is not None and shipped[0] != given:
        raise ConfigError(f"student {config.student!r} ships a tokenizer with fingerprint {shipped[0]}; student_tokenizer "
                          f"{config.student_tokenizer} has {given}. Pass the tokenizer the student was built for.")
    return transform


def _step(model, optimizer, batch: dict[str, Any], config: TrainConfig) -> float:
    from .losses import kd_loss
    from .losses_xtok import cross_tokenizer_kd_loss
    from .packing import student_inputs

    inputs = {key: v.to(config.device) if isinstance(v, torch.Tensor) else v
              for key, v in student_inputs(batch).items()}
    logits = model(**inputs).logits
    if config.student_tokenizer is not None:
        loss = cross_tokenizer_kd_loss(logits, batch, alpha=config.alpha)
    else:
        loss = kd_loss(logits, batch, alpha=config.alpha, kind=config.kind, impl=config.loss_impl)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip and config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return float(loss.detach())


def _batches(ds, collate, config: TrainConfig, run: _Run):
    """Batches forever, epoch after epoch (``run.batches`` reset at each new epoch)."""
    from torch.utils.data import DataLoader

    from .collate import send_batches_by_name

    while True:
        loader = DataLoader(ds, batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate,
                            worker_init_fn=send_batches_by_name if config.num_workers else None)
        fresh = ds.state_dict()["consumed"] == 0
        got = False
        for batch in loader:
            got = True
            yield batch
        if fresh and not got:
            raise ConfigError(f"store {config.store} yields no sequences")
        ds.set_epoch(ds.epoch + 1)
        run.batches = 0


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Distil into ``config.student`` from ``config.store`` until ``config.steps`` (resuming from
    ``config.out`` when it holds a ``train_state.json``). Evaluates on ``eval_store`` and saves a
    checkpoint every ``eval_every`` steps and at the end. Returns ``{"step", "losses" (this call's,
    one per step), "evals" (all, with their step), "tokens_per_second", "out"}``."""
    from tqdm.auto import tqdm

    out = Path(config.out)
    state = load_state(out, config.to_dict())
    run = _Run(state)
    model, optimizer, ds, transform = _setup(config, state)
    source = None if state else transform.student_tokenizer if transform else _student_source(config.student)
    collate = transform.collate if transform else ds.collate_packed if config.padding_free else ds.collate
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="train", unit="step")
    batches = _batches(ds, collate, config, run)
    try:
        while run.step < config.steps:
            batch = next(batches)
            started = time.perf_counter()
            loss = _step(model, optimizer, batch, config)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {run.step + 1}; lower lr or check the store")
            run.seconds += time.perf_counter() - started
            run.losses.append(loss)
            padded = batch.get("attention_mask")  # None for a packed batch: every token is real
            run.tokens += int(padded.sum()) if padded is not None else batch["input_ids"].numel()
            run.step, run.batches = run.step + 1, run.batches + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.tokens / max(run.seconds, 1e-9):.0f}")
            if config.eval_every > 0 and run.step % config.eval_every == 0 and run.step < config.steps:
                _checkpoint(model, optimizer, ds, config, run, source, transform)
    finally:
        batches.close()
        bar.close()
    _checkpoint(model, optimizer, ds, config, run, source, transform)
    return {"step": run.step, "losses": run.losses, "evals": run.evals,
            "tokens_per_second": run.tokens / max(run.seconds, 1e-9), "out": str(out)}


def _checkpoint(model, optimizer, ds, config: TrainConfig, run: _Run, source: Any, transform) -> None:
    """Evaluate (once per step, when there is an eval store), then save everything to ``config.out``."""
    if config.eval_store and (not run.evals or run.evals[-1]["step"] != run.step):
        metrics = evaluate(model, config.eval_store, kind=config.kind, batch_size=config.batch_size,
                           device=config.device, transform=transform)
        run.evals.append({"step": run.step, **metrics})
    state = {"step": run.step, "dataset": ds.state_dict(batches_consumed=run.batches),
             "config": config.to_dict(), "evals": run.evals}
    save_checkpoint(Path(config.out), model, optimizer, state, source)

