"""One trainer per output directory: an advisory ``flock`` on ``<output>/.trainer.lock``.

Two trainers writing one output directory corrupt each other's run (interleaved metrics, checkpoints of two
models under one name, and each one's clean-up removing the other's half-written checkpoint). The lock is
taken before anything is written and held until training ends. It is stale-safe by construction: the kernel
drops an ``flock`` when its process exits, however it exits (SIGKILL, OOM, power loss), so a lock file
left behind never blocks the next run. The file's content (pid, host, start time) only serves the
refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".trainer.lock"


class OutputInUse(RuntimeError):
    """Another live process holds the output directory's lock; the message says which."""


class OutputLock:
    """``acquire()`` or :class:`OutputInUse`; ``release()`` (idempotent). Re-acquiring while held is a no-op."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self.path = self.output / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        if self._fd is not None:
            return self
        self.output.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputInUse(f"output {self.output}: another trainer is using this directory ({holder}); wait "
                              "for it to finish, stop it, or give this run another output=") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without finishing still frees its directory
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
