"""Whether this environment's transformers reads a saved model directory as it was written."""

from __future__ import annotations

import json
from pathlib import Path


def newer_transformers(path: str | Path) -> str | None:
    """Why transformers here would misread the model directory ``path`` — its ``config.json`` written by a later major
    version — or None. transformers 4.x reads 5.x's configs with its own defaults where keys moved:
    ``rope_parameters`` unseen, RoPE falls back to base 10,000 (SmolLM2's is 100,000, Llama 3's 500,000), which
    is another model, silently."""
    try:
        written = json.loads((Path(path) / "config.json").read_text()).get("transformers_version", "")
    except (OSError, ValueError, AttributeError):
        return None  # no readable config: the loader says so
    import transformers

    if not isinstance(written, str) or _major(written) <= _major(transformers.__version__):
        return None
    return (f"{Path(path) / 'config.json'} was written by transformers {written}; this environment has transformers "
            f"{transformers.__version__}, which reads a later major version's config as another model (5.x's "
            "rope_parameters unseen: RoPE base 10,000) or not at all. Install transformers >= "
            f"{_major(written)} here, or save the model again with this version")


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0
