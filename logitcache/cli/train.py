"""``logitcache train``: the plain distillation loop of :mod:`logitcache.train.loop` from the command line.

Registered on the main group with ``main.add_command(train_command)`` (see :mod:`logitcache.cli`).
An optional YAML config (``--config``, ``kind: train``) is read first; flags override it field by field.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ..choices import DTYPES, LOSS_IMPLS, LOSS_KINDS
from ..jobfile import read_job_file

__all__ = ["load_train_config", "train_command"]


def load_train_config(path: str | None, overrides: dict[str, Any]):
    """A :class:`~logitcache.train.loop.TrainConfig` from an optional YAML file plus flag overrides (``None`` = not given)."""
    from ..train.loop import TrainConfig

    data: dict[str, Any] = read_job_file(path, "train") if path else {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    return TrainConfig.from_dict(data)


@click.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML train config (kind: train); flags override it.")
@click.option("--store", help="Store directory to train from.")
@click.option("--student", help="HF model directory, or init:<teacher>:<layers> (the teacher's first layers).")
@click.option("--out", help="Output directory (student, optimizer.pt, train_state.json); resumes if it holds a run.")
@click.option("--eval-store", help="Store to evaluate on (CE, KL, top-1 agreement).")
@click.option("--alpha", type=float, help="Weight of the KD term: (1-α)·CE + α·KD (default 0.5).")
@click.option("--loss-kind", "kind", type=click.Choice(LOSS_KINDS),
              help="KD loss kind (default auto).")
@click.option("--loss-impl", "loss_impl", type=click.Choice(LOSS_IMPLS),
              help="The loss's student side: plain (default) or compiled (torch.compile; falls back to plain "
                   "with one warning where compiling fails).")
@click.option("--lr", type=float, help="AdamW learning rate (default 3e-4).")
@click.option("--batch-size", type=int, help="Sequences per step (default 8).")
@click.option("--steps", type=int, help="Total optimizer steps (default 100).")
@click.option("--eval-every", type=int, help="Evaluate and checkpoint every N steps (default 50).")
@click.option("--seed", type=int, help="Data order and init seed (default 0).")
@click.option("--num-workers", type=int, help="DataLoader workers (default 0).")
@click.option("--device", help="cpu, cuda, cuda:N (default cpu).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Student dtype (default float32).")
@click.option("--grad-clip", type=float, help="Gradient-norm clip; 0 disables (default 1.0).")
@click.option("--padding-free/--padded", "padding_free", default=None,
              help="Each step's sequences in one packed row [1, total] with per-sequence position_ids, "
                   "no padding (default --padded: [B, T] right-padded).")
@click.option("--student-tokenizer", type=click.Path(exists=True),
              help="Cross-tokenizer mode: the student's tokenizer (a directory or tokenizer.json), when it differs "
                   "from the store's; targets are moved into its tokens (docs/cross_tokenizer.md).")
@click.option("--teacher-tokenizer", type=click.Path(exists=True),
              help="With --student-tokenizer: the tokenizer the store was captured with (default: the tokenizer of "
                   "the teacher the store's manifest names).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(config_path, quiet, **flags) -> None:
    """Distil a student from a store (plain loop; resumable with the same command)."""
    from ..train.loop import train

    config = load_train_config(config_path, flags)
    result = train(config, progress=not quiet)
    last = result["evals"][-1] if result["evals"] else None
    click.echo(f"trained to step {result['step']} ({result['tokens_per_second']:.0f} tok/s); "
               f"student in {result['out']}", err=True)
    click.echo(json.dumps({"step": result["step"], "final_loss": result["losses"][-1] if result["losses"] else None,
                           "eval": last}, sort_keys=True))
