"""A store that cannot be written (file-size limit, disk full, permission denied, read-only filesystem):
the CLI prints one line saying what happened and what to do, and the store stays valid and resumable.

Without root, disk full is simulated with RLIMIT_FSIZE (writes fail with EFBIG), permission denied with
chmod. With root, a tiny tmpfs gives a real ENOSPC and a read-only remount a real EROFS, and
permission denied is real once the capture runs without CAP_DAC_OVERRIDE (``setpriv``)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.store import inspect_store, verify_store
from logitcache.store.commit import dump_json
from logitcache.testing.crash import cli_command, job_args, run_with_fault, tree_bytes

IS_ROOT = os.geteuid() == 0


def io_config(teacher: str, out: Path, *, small_shards: bool) -> CaptureConfig:
    """Big shards (~6 kB, larger than the manifest header) or small ones (final manifest larger than any)."""
    seq_len, per_shard, units = (8, 1, 16) if small_shards else (32, 2, 4)
    return CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "corpus.seq_len": seq_len,
        "corpus.max_tokens": seq_len * per_shard * units, "store.path": str(out),
        "store.sequences_per_shard": per_shard, "sparsify.method": "hybrid", "sparsify.k": 5,
        "sparsify.samples": 20})


@pytest.fixture(scope="module")
def refs(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("io_ref")
    out = {}
    for small in (False, True):
        config = io_config(tiny_teacher, root / f"small{small}", small_shards=small)
        capture(config, progress=False)
        out[small] = config
    return out


def sizes(store: Path) -> dict[str, int]:
    """Sizes of the files a capture writes: the initial manifest (header), largest shard, final manifest."""
    manifest = json.loads((store / "manifest.json").read_text())
    header = len(dump_json(dict(manifest, complete=False, shards=[])))
    shard = max(p.stat().st_size for p in (store / "shards").iterdir())
    return {"header": header, "shard": shard, "final": (store / "manifest.json").stat().st_size}


def run_cli(config: CaptureConfig, out: Path, job: Path, *, prefix: list[str] = (), preexec=None, env=None):
    args = job_args(config.with_overrides({"store.path": str(out)}), job)
    return subprocess.run([*prefix, *cli_command(args)], capture_output=True, text=True, preexec_fn=preexec,
                          env=env)


def run_convert_cli(src: str | Path, dst: Path, *, preexec=None):
    return subprocess.run(cli_command(["convert", str(src), str(dst), "--ids", "packed"]), capture_output=True,
                          text=True, preexec_fn=preexec)


def file_size_limit(limit: int):
    """A ``preexec_fn`` capping the size of any file the child writes at ``limit`` bytes."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return limit_file_size


def assert_one_clean_line(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # (earlier lines: the teacher's loading bar)
    assert last.startswith("error: cannot write the store") and "rerun the same command to resume" in last, last
    for fragment in fragments:
        assert fragment in last, last


def assert_resumes_to_reference(config: CaptureConfig, out: Path) -> None:
    if (out / "manifest.json").exists():
        assert verify_store(out).ok
    capture(config.with_overrides({"store.path": str(out)}), progress=False)
    assert tree_bytes(out) == tree_bytes(config.store.path)


@pytest.mark.parametrize("where", ["first manifest", "first shard", "final manifest"])
def test_file_size_limit_is_a_clean_error_and_the_store_resumes(refs, tmp_path, where):
    config = refs[where == "final manifest"]
    s = sizes(Path(config.store.path))
    limit = {"first manifest": s["header"] - 1, "first shard": s["shard"] - 1, "final manifest": s["final"] - 1}[where]
    # preconditions: the limit stops the capture exactly where intended
    if where == "first shard":
        assert s["header"] <= limit
    if where == "final manifest":
        assert s["header"] <= limit and s["shard"] <= limit

    out = tmp_path / "s"
    result = run_cli(config, out, tmp_path / "j.yaml", preexec=file_size_limit(limit))
    assert_one_clean_line(result, "a file exceeded the file-size limit", "ulimit -f")
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    if where == "final manifest":
        info = inspect_store(out)
        assert not info["complete"] and info["shards"] == info["planned_shards"]
    assert_resumes_to_reference(config, out)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 40 kB tmpfs mounted at tmp_path/mnt (root only), unmounted afterwards."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root; test_file_size_limit_* covers the same path without root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def test_disk_full_is_a_clean_error_and_the_store_resumes(refs, tiny_tmpfs, tmp_path):
    config = refs[False]
    out = tiny_tmpfs / "s"
    result = run_cli(config, out, tmp_path / "j.yaml")
    assert_one_clean_line(result, "the disk is full", "free space")
    committed = inspect_store(out)["shards"]
    assert 0 < committed < inspect_store(config.store.path)["shards"]  # it stopped part-way
    assert verify_store(out).ok and not list(out.rglob("*.tmp"))
    remount(tiny_tmpfs, "size=8m")  # free space, then rerun
    assert_resumes_to_reference(config, out)


def test_read_only_filesystem_is_a_clean_error_and_the_store_resumes(refs, tiny_tmpfs, tmp_path):
    config = refs[False]
    remount(tiny_tmpfs, "size=8m")
    out = tiny_tmpfs / "s"
    killed = run_with_fault(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "k.yaml"),
                            "after_commit:1")
    assert killed.returncode == -signal.SIGKILL
    before = tree_bytes(out)
    remount(tiny_tmpfs, "ro")
    result = run_cli(config, out, tmp_path / "j.yaml")
    assert_one_clean_line(result, "read-only filesystem", "remount it read-write")
    assert tree_bytes(out) == before and verify_store(out).ok
    remount(tiny_tmpfs, "rw")
    assert_resumes_to_reference(config, out)


@pytest.mark.parametrize("cause", ["disk full", "file-size limit"])
def test_convert_write_errors_read_as_capture_ones_and_the_store_resumes(refs, request, tmp_path, cause):
    """convert writes through the commit path capture uses, so a full disk (or the file-size limit) gives the
    same one line as the capture tests above, and rerunning it resumes to the bytes of an unhindered convert."""
    src = refs[False].store.path
    reference = tmp_path / "ref"
    assert run_convert_cli(src, reference).returncode == 0
    if cause == "disk full":
        mnt = request.getfixturevalue("tiny_tmpfs")
        out, preexec, fragments = mnt / "c", None, ("the disk is full", "free space")
    else:
        limit = sizes(reference)["shard"] - 1
        assert sizes(reference)["header"] <= limit  # precondition: the header fits, a shard does not
        out, preexec, fragments = tmp_path / "c", file_size_limit(limit), ("file-size limit", "ulimit -f")
    assert_one_clean_line(run_convert_cli(src, out, preexec=preexec), *fragments)
    assert inspect_store(out)["shards"] < inspect_store(src)["shards"]  # it stopped part-way
    assert verify_store(out).ok and not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    if cause == "disk full":
        remount(mnt, "size=8m")  # free space, then rerun
    resumed = run_convert_cli(src, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tree_bytes(out) == tree_bytes(reference)


def _without_dac_override() -> list[str]:
    """A command prefix that makes permission bits bind (root bypasses them through CAP_DAC_OVERRIDE)."""
    if not IS_ROOT:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permission bits do not restrict root, nothing to test")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def test_permission_denied_is_a_clean_error_and_the_store_resumes(refs, tmp_path):
    config = refs[False]
    prefix = _without_dac_override()
    out = tmp_path / "s"
    killed = run_with_fault(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "k.yaml"),
                            "after_commit:1")
    assert killed.returncode == -signal.SIGKILL
    (out / ".lock").unlink()  # (a dead writer's lock; taking it over needs a writable directory)
    before = tree_bytes(out)
    dirs = [out, out / "shards", out / "commits"]
    for d in dirs:
        d.chmod(0o555)
    try:
        result = run_cli(config, out, tmp_path / "j.yaml", prefix=prefix)
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert_one_clean_line(result, "permission denied", "make the store directory writable")
    assert tree_bytes(out) == before and verify_store(out).ok
    assert_resumes_to_reference(config, out)
