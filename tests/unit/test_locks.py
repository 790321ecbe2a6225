"""The writer lock's owner check (docs/reliability.md, "Concurrency"): a restarted process never mistakes
a dead writer's lock for its own, a live writer is never taken over, and the lease decides where no pid
can be probed. Real processes, real /proc, a real PID-namespace restart where the machine allows it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logitcache.capture import capture
from logitcache.errors import StoreLockedError
from logitcache.faults import TRACE_PREFIX
from logitcache.store.lock import LockOwner, StoreLock, stale_reason, start_time
from logitcache.testing.crash import cli_command, job_args, tree_bytes

from helpers import make_config


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it (pids are not reused this soon)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _stale(lock: LockOwner, me: LockOwner | None = None, now: float | None = None) -> str | None:
    return stale_reason(lock, me or LockOwner.new(), now=now or time.time(), expiry_s=300)


# ---- the owner check, either way -------------------------------------------------------------------------------

def test_our_own_pid_in_a_lock_this_process_never_took_is_stale():
    me = LockOwner.new()
    restarted = dataclasses.replace(me, instance="0" * 32, started=(me.started or 0) - 5)  # the killed PID 1
    assert "never took it" in _stale(restarted, me)
    old_format = LockOwner(me.host, me.pid)  # {"host", "pid"} as written before instance ids
    assert "never took it" in _stale(old_format, me)


def test_our_own_pid_in_a_lock_this_process_holds_is_live(tmp_path):
    with StoreLock(tmp_path):
        held = LockOwner.parse((tmp_path / ".lock").read_bytes())
        assert held.pid == os.getpid() and _stale(held) is None
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            with StoreLock(tmp_path):
                pass


def test_a_live_other_process_is_live_and_a_reused_pid_is_stale(sleeper):
    me = LockOwner.new()
    live = LockOwner(me.host, sleeper.pid, "1" * 32, me.boot_id, start_time(sleeper.pid))
    assert live.started is not None and _stale(live, me) is None
    assert _stale(LockOwner(me.host, sleeper.pid), me) is None  # old format: the pid alone, alive
    reused = dataclasses.replace(live, started=live.started - 1)
    assert "is another process" in _stale(reused, me)


def test_pid_1_seen_from_outside_the_namespace_is_init_not_the_writer():
    me = LockOwner.new()
    init_started = start_time(1)
    if init_started is None:
        pytest.skip("/proc/1/stat is not readable here")
    killed_capture = LockOwner(me.host, 1, "2" * 32, me.boot_id, init_started + 1000)
    assert "is another process" in _stale(killed_capture, me)
    if me.pid != 1:
        assert _stale(dataclasses.replace(killed_capture, started=init_started), me) is None  # init itself


def test_a_dead_pid_and_another_boot_are_stale(sleeper):
    me = LockOwner.new()
    assert "is not running" in _stale(LockOwner(me.host, _dead_pid(), "3" * 32, me.boot_id), me)
    if me.boot_id is None:
        pytest.skip("no /proc/sys/kernel/random/boot_id here")
    before_reboot = LockOwner(me.host, sleeper.pid, "4" * 32, "another-boot", start_time(sleeper.pid))
    assert "booted" in _stale(before_reboot, me)


def test_another_host_is_refused_until_its_lease_expires():
    me = LockOwner.new()
    now = time.time()
    assert _stale(LockOwner("other-host", 4242), me, now) is None  # no heartbeat: written before leases
    assert _stale(LockOwner("other-host", 4242, heartbeat=now - 299), me, now) is None
    assert "heartbeat is 301 s old" in _stale(LockOwner("other-host", 4242, heartbeat=now - 301), me, now)


@pytest.mark.parametrize("raw", [b"", b"  \n", b"not json", b"[1, 2]", b'{"host": "h"}', b'{"host": 1, "pid": 2}'])
def test_a_lock_naming_no_writer_is_refused(tmp_path, raw):
    assert LockOwner.parse(raw) is None
    (tmp_path / ".lock").write_bytes(raw)
    with pytest.raises(StoreLockedError, match="names no writer"):
        with StoreLock(tmp_path):
            pass


# ---- StoreLock: takeover, heartbeat, lease, a lock lost while held --------------------------------------------

def _write_lock(path: Path, owner: LockOwner) -> None:
    path.write_bytes(owner.to_bytes())


def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, sleeper):
    me = LockOwner.new()
    lock = tmp_path / ".lock"
    for stale in (LockOwner(me.host, me.pid), LockOwner(me.host, _dead_pid(), "5" * 32),
                  LockOwner("other-host", 4242, heartbeat=time.time() - 400)):
        _write_lock(lock, stale)
        with StoreLock(tmp_path) as held:
            assert LockOwner.parse(lock.read_bytes()).instance == held.owner.instance
        assert not lock.exists()
    for live in (LockOwner(me.host, sleeper.pid, "6" * 32, me.boot_id, start_time(sleeper.pid)),
                 LockOwner("other-host", 4242, heartbeat=time.time() - 10)):
        _write_lock(lock, live)
        with pytest.raises(StoreLockedError, match=f"pid {live.pid} on host {live.host}"):
            with StoreLock(tmp_path):
                pass
        assert LockOwner.parse(lock.read_bytes()) == live  # left alone


def test_the_heartbeat_refreshes_the_lock(tmp_path):
    with StoreLock(tmp_path, heartbeat_s=0.02) as held:
        first = LockOwner.parse((tmp_path / ".lock").read_bytes()).heartbeat
        _wait_for(lambda: LockOwner.parse((tmp_path / ".lock").read_bytes()).heartbeat > first + 0.05)
        assert not held.lost
    assert not (tmp_path / ".lock").exists() and not list(tmp_path.iterdir())  # no heartbeat temp file left


def test_a_lock_taken_over_while_held_is_reported_and_not_removed(tmp_path):
    other = LockOwner("other-host", 4242, "7" * 32, heartbeat=time.time())
    with pytest.raises(StoreLockedError, match="was taken from this process"):
        with StoreLock(tmp_path, heartbeat_s=0.02) as held:
            _write_lock(tmp_path / ".lock", other)  # what a taker writes once our lease looked expired
            _wait_for(lambda: held.lost is not None)
    assert LockOwner.parse((tmp_path / ".lock").read_bytes()) == other


def test_object_store_lock_uses_the_lease(sleeper):
    pytest.importorskip("fsspec")
    from logitcache.store.fs import StoreFS

    fs = StoreFS(f"memory://locks-{os.getpid()}-{time.monotonic_ns()}")
    fresh = LockOwner("other-host", 4242, "8" * 32, heartbeat=time.time() - 5)
    fs.write(".lock", fresh.to_bytes())
    with pytest.raises(StoreLockedError, match=r"lock object .*heartbeat is 5 s old.*older than 300 s"):
        with StoreLock(fs):
            pass
    fs.write(".lock", dataclasses.replace(fresh, heartbeat=time.time() - 301).to_bytes())
    with StoreLock(fs) as held:
        assert LockOwner.parse(bytes(fs.read(".lock"))).instance == held.owner.instance
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):  # a second writer of this process
            with StoreLock(fs):
                pass
    assert not fs.exists(".lock")


# ---- two processes taking over one stale lock: exactly one holds it -------------------------------------------

HOLDER = """
import sys
from logitcache.capture import capture
from logitcache.errors import StoreLockedError
from logitcache.store.lock import StoreLock
print("trying", flush=True)
try:
    with StoreLock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()  # hold until the test closes stdin
except StoreLockedError:
    print("refused", flush=True)
"""


def _holder(root: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_two_takers_of_one_stale_lock_never_both_hold_it(tmp_path):
    _write_lock(tmp_path / ".lock", LockOwner(socket.gethostname(), _dead_pid(), "9" * 32))
    first = _holder(tmp_path, {"LOGITCACHE_FAULT": "lock_takeover:1:stop"})  # judged stale, not yet removed
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status) and first.stdout.readline().strip() == "trying"
    second = _holder(tmp_path)
    try:
        assert second.stdout.readline().strip() == "trying"
        os.set_blocking(second.stdout.fileno(), False)
        time.sleep(1.0)  # room for a second taker to go through (it must wait for the first instead)
        early = second.stdout.readline().strip()
        os.set_blocking(second.stdout.fileno(), True)
        first.send_signal(signal.SIGCONT)
        outcomes = [first.stdout.readline().strip(), early or second.stdout.readline().strip()]
    finally:
        for proc in (first, second):
            proc.stdin.close()
            proc.wait()
    assert sorted(outcomes) == ["held", "refused"], outcomes


# ---- a capture restarted as PID 1 of a new PID namespace resumes -----------------------------------------------

def _namespaces_work() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare(1) here"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        return f"unshare --pid --fork --mount-proc does not work here (needs root): {probe.stderr.strip()[:200]}"
    return None


def _as_pid_1(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *cli_command(args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_namespace_after_first_commit(proc: subprocess.Popen) -> None:
    """SIGKILL the capture (PID 1 inside, so killed from here) once its first unit is committed."""
    for line in proc.stderr:
        if line.startswith(f"{TRACE_PREFIX} after_commit 1"):
            init = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
            os.kill(init, signal.SIGKILL)
            break
    proc.stderr.close()
    proc.wait()


def test_a_capture_restarted_as_pid_1_of_a_new_namespace_resumes(tiny_teacher, tmp_path):
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)
    reference = make_config(tiny_teacher, tmp_path / "ref")
    capture(reference, progress=False)  # uninterrupted
    out = tmp_path / "s"
    args = job_args(make_config(tiny_teacher, out), tmp_path / "j.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITCACHE_FAULT")}
    _kill_namespace_after_first_commit(_as_pid_1(args, {**env, "LOGITCACHE_FAULT_TRACE": "-"}))
    lock = LockOwner.parse((out / ".lock").read_bytes())
    assert lock.pid == 1 and json.loads((out / "manifest.json").read_text())["complete"] is False
    restarted = _as_pid_1(args, env)  # PID 1 again, same host: reads {"pid": 1, ...}, which is not its own
    _, stderr = restarted.communicate()
    assert restarted.returncode == 0, stderr[-2000:]
    assert "taking over the stale lock of pid 1" in stderr and "never took it" in stderr
    assert tree_bytes(out) == tree_bytes(reference.store.path)
