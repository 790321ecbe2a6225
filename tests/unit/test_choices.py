"""Every ``click.Choice`` of the CLI offers exactly the tuple of :mod:`logitcache.choices` for its option,
so a list retyped in the CLI (and then edited in one place only) fails here."""

from __future__ import annotations

import click
import pytest

from logitcache import choices
from logitcache.cli import main

# (command, option) -> the tuple its choices must equal
EXPECTED = {
    ("capture", "backend"): choices.BACKENDS,
    ("capture", "dtype"): choices.DTYPES,
    ("capture", "method"): choices.METHODS,
    ("capture", "format"): choices.FORMATS,
    ("capture", "logprob_dtype"): choices.LOGPROB_DTYPES,
    ("capture", "ids"): choices.ID_CHOICES,
    ("capture", "entropy"): choices.ENTROPY_CODECS,
    ("capture", "layout"): choices.LAYOUTS,
    ("capture", "long_sequences"): choices.LONG_SEQUENCES,
    ("capture", "train_on"): choices.TRAIN_ON,
    ("capture", "sample_allocation"): choices.ALLOCATIONS,
    ("convert", "format"): choices.FORMATS,
    ("convert", "ids"): choices.ID_CHOICES,
    ("convert", "logprob_dtype"): choices.LOGPROB_DTYPES,
    ("convert", "entropy"): choices.ENTROPY_CODECS,
    ("train", "kind"): choices.LOSS_KINDS,
    ("train", "dtype"): choices.DTYPES,
    ("train", "loss_impl"): choices.LOSS_IMPLS,
}


def choice_options() -> dict[tuple[str, str], tuple[str, ...]]:
    """``(command, option) -> choices`` of every Choice option of every command of the CLI."""
    return {(name, param.name): tuple(param.type.choices)
            for name, command in main.commands.items()
            for param in command.params if isinstance(param.type, click.Choice)}


def test_every_choice_option_is_listed():
    assert set(choice_options()) == set(EXPECTED)


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda key: "-".join(key))
def test_choices_equal_the_shared_tuple(key):
    assert choice_options()[key] == EXPECTED[key]
