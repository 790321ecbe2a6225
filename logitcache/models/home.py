"""The per-user cache directory that holds converted teachers and the weights-hash cache."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LOGITCACHE_HOME"


def logitcache_home() -> Path:
    """The per-user cache directory: ``$LOGITCACHE_HOME``, else ``~/.cache/logitcache``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "logitcache"
