"""``python -m logitcache.cli``: the same as the ``logitcache`` command."""

from . import run

run()
