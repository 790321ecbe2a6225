"""The weights hash of a model directory, cached per user so it is computed once per file set.

``weights_sha256(dir)`` is the sha256 of the concatenated bytes of the directory's weight files
(``*.safetensors``, else ``pytorch_model*.bin``) in name order; for a single-file model it equals
``sha256sum model.safetensors``. The result is cached in ``$LOGITCACHE_HOME/hashes.json``, keyed by
every file's (absolute path, size, mtime): touching or rewriting a file invalidates its entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..errors import TeacherError
from .home import logitcache_home

_BLOCK = 8 << 20
_CACHE_NAME = "hashes.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The files that hold the weights, sorted by name (safetensors preferred, as transformers does)."""
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        files = sorted(p for p in model_dir.glob("pytorch_model*.bin") if p.is_file())
    return files


def weights_sha256(model_dir: str | os.PathLike, *, home: Path | None = None) -> str:
    """sha256 (hex) over the weight files of ``model_dir``, using and updating the per-user cache."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise TeacherError(
            f"no weight files in {model_dir}; expected *.safetensors or pytorch_model*.bin next to config.json"
        )
    key = json.dumps([_file_key(p) for p in files])
    cache_path = (home or logitcache_home()) / _CACHE_NAME
    cache = _read_cache(cache_path)
    digest = cache.get(key)
    if digest is None:
        digest = hash_files(files)
        cache[key] = digest
        _write_cache(cache_path, cache)
    return digest


def _file_key(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def hash_files(files: list[Path]) -> str:
    """sha256 (hex) of the concatenated bytes of ``files``, streamed."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return dict(entries) if isinstance(entries, dict) else {}


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written only costs a re-hash next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes-", suffix=".json")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "entries": cache}, f, indent=0)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
