"""Evaluation and checkpoints of the built-in loop (:mod:`logitcache.train.loop`).

:func:`evaluate` measures a student over a whole store. A checkpoint in ``out`` is the student
(``save_pretrained``, with its tokenizer), ``optimizer.pt`` and, written last and atomically,
``train_state.json``; :func:`load_state` reads it back for a resume, refusing one whose run differs in a
field the resume depends on. The loop's public names (``evaluate`` among them) stay importable from
:mod:`logitcache.train.loop`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["OPTIMIZER_FILE", "STATE_FILE", "evaluate", "load_state", "save_checkpoint"]

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
# fields a resumed run must share with the run that wrote the state (others may change)
_RESUME_FIELDS = ("store", "student", "batch_size", "seed", "dtype", "student_tokenizer")


def _save_tokenizer(source: Any, out: Path) -> None:
    """Copy the student's tokenizer next to it: ``source`` a loaded tokenizer, or a directory that may hold one."""
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(out)
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    except (OSError, ValueError):
        pass


# -- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, store: str, *, kind: str = "auto", batch_size: int = 8, device: str = "cpu",
             transform=None) -> dict[str, float]:
    """Token-weighted means over a whole store (:class:`~logitcache.train.dataset.CacheView`): ``ce``
    (cross-entropy on labels), ``kl`` (``kd_loss(alpha=1, kind)``, KL(t̂‖p)) and, when the targets
    have a head, ``top1`` (student argmax equals the teacher's top entry). With a ``transform`` (a
    cross-tokenizer run): :func:`~logitcache.train.cross_tokenizer.evaluate_cross_tokenizer` instead."""
    from torch.utils.data import DataLoader

    from .cross_tokenizer import evaluate_cross_tokenizer
    from .dataset import CacheView
    from .losses import kd_loss

    if transform is not None:
        return evaluate_cross_tokenizer(model, store, transform, batch_size=batch_size, device=device)

    view = CacheView(store)
    was_training = model.training
    model.eval()
    sums, tokens, head = {"ce": 0.0, "kl": 0.0, "top1": 0.0}, 0, False
    for batch in DataLoader(view, batch_size=batch_size, collate_fn=view.collate):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        valid = (batch["labels"] != -100).to(device)
        n = int(valid.sum())
        sums["ce"] += float(kd_loss(logits, batch, alpha=0.0)) * n
        sums["kl"] += float(kd_loss(logits, batch, alpha=1.0, kind=kind)) * n
        if int(batch["target_head_size"]) > 0:
            head = True
            agree = logits.argmax(-1) == batch["target_ids"][..., 0].to(device)
            sums["top1"] += float((agree & valid).sum())
        tokens += n
    model.train(was_training)
    metrics = {key: value / max(tokens, 1) for key, value in sums.items()}
    if not head:
        del metrics["top1"]
    return {**metrics, "tokens": tokens}


# -- checkpoints ------------------------------------------------------------------------------

def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_state(out: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The state of a previous run in ``out``, or ``None``; refused when its config differs from this run's
    (``config``: ``TrainConfig.to_dict()``) in a field a resume depends on."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    for name in _RESUME_FIELDS:
        found, expected = state["config"].get(name), config[name]
        if found != expected:
            raise ConfigError(f"cannot resume in {out}: config field {name!r} is {expected!r}, the saved run used "
                              f"{found!r}. Use the same {name}, or another --out.")
    return state


def save_checkpoint(out: Path, model, optimizer, state: dict[str, Any], source: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if source is not None:
        _save_tokenizer(source, out)
    tmp = out / (OPTIMIZER_FILE + ".tmp")
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, out / OPTIMIZER_FILE)
    _write_json_atomic(out / STATE_FILE, state)
