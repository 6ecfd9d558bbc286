"""Running model-written code: a throw-away directory, resource limits, no network, and a kill that sticks.

Each program runs in a fresh ``python -I -S`` process (``_sandbox_child.py``) in its own session, with:

- **time**: a wall-clock limit (the process group is killed when it passes) and ``RLIMIT_CPU`` behind it;
- **memory**: ``RLIMIT_AS`` (an allocation past it raises ``MemoryError``);
- **processes**: ``RLIMIT_NPROC``. As root (CI, containers) each run gets an unused uid of its own, so the
  bound is exact (``max_processes``) and, after the run, every process of that uid is killed even if it
  left the process group; otherwise no new process may be created at all;
- **network**: a new network namespace (as root, or through a user namespace where the kernel allows),
  plus the audit hook refusing sockets;
- **files**: the working directory is a fresh temporary folder, removed afterwards; as root the program
  runs under its uid, so the kernel refuses writes to anything not world-writable; ``RLIMIT_FSIZE`` bounds
  what it writes; the audit hook refuses writes, removals and renames outside the folder;
- **nothing inherited**: a minimal environment, stdin from /dev/null, only the result pipe and the log
  file as open descriptors.

Success is the nonce written to the result pipe after the program's own checks returned (exit status
0 alone is not enough: ``os._exit(0)`` before the checks, or printing "passed", is a failure).

This is a harness for model output, which is careless rather than hostile. It is not a security
boundary against code written to escape it: run untrusted code in a VM or container as well.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
_UID_BASE = 0x5EED0000
_uid_lock = threading.Lock()
_uid_next = [secrets.randbelow(1 << 15)]


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    max_processes: int = 4            # processes + threads of the sandbox uid, itself included (root only)
    file_bytes: int = 16 << 20        # largest file the program may write (its output log included)
    require_network_isolation: bool = False   # fail instead of relying on the audit hook alone

    def describe(self) -> dict[str, object]:
        return {"timeout_s": self.timeout_s, "memory_bytes": self.memory_bytes,
                "max_processes": self.max_processes if os.geteuid() == 0 else 1, "file_bytes": self.file_bytes,
                "uid_per_run": os.geteuid() == 0}


@dataclass
class Outcome:
    passed: bool
    status: str          # passed | failed | timed out | error (the sandbox itself could not be set up)
    detail: str          # the program's last output / the error, bounded
    wall_s: float


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                        break   # dead, waiting to be reaped: nothing left to kill
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _new_uid() -> int:
    with _uid_lock:
        for _ in range(64):
            _uid_next[0] = (_uid_next[0] + 1) % (1 << 15)
            uid = _UID_BASE + _uid_next[0]
            if not _processes_of(uid):
                return uid
    raise RuntimeError("sandbox: no free uid found for the run")


def _kill_all(pgid: int, uid: int | None) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(100):   # RLIMIT_NPROC bounds how many there can be; each pass kills all it sees
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(program: str, limits: Limits | None = None) -> Outcome:
    """Run ``program`` (Python source) in the sandbox; it passes if it runs to its end without an exception."""
    limits = limits or Limits()
    root = Path(tempfile.mkdtemp(prefix="mamba-moe-sandbox-"))
    start = time.monotonic()
    uid = _new_uid() if os.geteuid() == 0 else None
    read_fd = write_fd = -1
    proc = None
    try:
        work = root / "work"
        work.mkdir()
        program_path = root / "program.py"
        program_path.write_text(program, encoding="utf-8")
        program_path.chmod(0o644)
        root.chmod(0o755)
        if uid is not None:
            os.chown(work, uid, uid)
        read_fd, write_fd = os.pipe()
        config = {"program": str(program_path), "result_fd": write_fd, "uid": uid,
                  "memory_bytes": limits.memory_bytes, "cpu_s": int(math.ceil(limits.timeout_s)) + 1,
                  "file_bytes": limits.file_bytes, "max_processes": limits.max_processes,
                  "require_network_isolation": limits.require_network_isolation}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        log_path = root / "output.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(CHILD), json.dumps(config)], cwd=work,
                                    env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        nonce = secrets.token_hex(16)
        try:
            proc.stdin.write(f"{nonce}\n".encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_all(proc.pid, uid)
        proc.wait()
        os.set_blocking(read_fd, False)
        try:
            result = os.read(read_fd, 4096).decode("utf-8", "replace")
        except BlockingIOError:
            result = ""
        wall = time.monotonic() - start
        if timed_out:
            return Outcome(False, "timed out", f"no result within {limits.timeout_s:g} s", wall)
        if proc.returncode == 0 and result == f"{nonce} passed":
            return Outcome(True, "passed", "", wall)
        if result.startswith("error:"):
            return Outcome(False, "error", result, wall)
        detail = result if result.startswith("failed") else (
            f"exit status {proc.returncode}" + (f" ({result})" if result else ""))
        tail = _tail(log_path).strip()
        return Outcome(False, "failed", f"{detail}\n{tail}".strip()[-2000:], wall)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_all(proc.pid, uid)
            proc.wait()
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)


def check_sandbox(limits: Limits | None = None) -> None:
    """Run a trivial program once; raise RuntimeError naming the cause if the sandbox cannot run code here
    (rather than failing every sample of a benchmark for a reason that is not the model's)."""
    outcome = run_program("assert sum([1, 2]) == 3\n", limits)
    if not outcome.passed:
        raise RuntimeError(f"sandbox: a trivial program did not pass here ({outcome.status}: {outcome.detail})")
