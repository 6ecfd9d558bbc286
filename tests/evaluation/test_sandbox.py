"""The sandbox against hostile programs: each is stopped and failed, and the harness survives, promptly."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from mamba_moe.evaluation.sandbox import _UID_BASE, Limits, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

LIMITS = Limits(timeout_s=2.0, memory_bytes=512 << 20)
SLACK_S = 10.0  # process start-up and cleanup on a busy 2-core machine: generous, yet no hang passes


def run(program: str, limits: Limits = LIMITS):
    start = time.monotonic()
    outcome = run_program(program, limits)
    assert time.monotonic() - start < limits.timeout_s + SLACK_S, "the harness waited past the time limit"
    return outcome


def no_sandbox_processes_left():
    """As root each run has a uid in [_UID_BASE, _UID_BASE + 2**15): no live process may keep one."""
    if os.geteuid() != 0:
        return
    left = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{entry}/status").read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        if _UID_BASE <= uid < _UID_BASE + (1 << 15) and fields.get("State", "").split()[0] not in ("Z", "X"):
            left.append(entry)
    assert not left, f"sandbox processes survived their run: {left}"


def test_correct_program_passes():
    outcome = run("def f(x):\n    return x + 1\nassert f(1) == 2\n")
    assert outcome.passed and outcome.status == "passed"


def test_failing_assertion_fails_with_its_message():
    outcome = run("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not outcome.passed and outcome.status == "failed" and "arithmetic" in outcome.detail


@pytest.mark.parametrize("program", [
    "print('passed')\nraise ValueError('no')\n",        # prints the success word, then fails
    "import os\nos._exit(0)\n",                          # exit status 0 before any check ran
    "import sys\nsys.exit(0)\n",                         # SystemExit(0)
    "raise KeyboardInterrupt\n",
])
def test_claimed_success_is_not_success(program):
    outcome = run(program)
    assert not outcome.passed and outcome.status == "failed"


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(3600)\n",
                                     "import threading\nthreading.Event().wait()\n"])
def test_hangs_are_stopped(program):
    outcome = run(program)
    assert not outcome.passed and outcome.status == "timed out"
    no_sandbox_processes_left()


def test_fork_bomb_is_stopped():
    outcome = run("import os\nwhile True:\n    os.fork()\n")
    assert not outcome.passed
    no_sandbox_processes_left()


def test_subprocesses_are_refused():
    outcome = run("import subprocess\nsubprocess.run(['sh', '-c', 'sleep 100'])\n")
    assert not outcome.passed and "not allowed" in outcome.detail
    no_sandbox_processes_left()


def test_threads_are_bounded_by_the_kernel():
    # RLIMIT_NPROC counts threads: the kernel, not the audit hook, refuses the fifth (or, not as root, the first).
    program = ("import threading\nevents, started = threading.Event(), 0\n"
               "try:\n    for _ in range(64):\n        threading.Thread(target=events.wait, daemon=True).start()\n"
               "        started += 1\nexcept RuntimeError:\n    pass\nevents.set()\nassert started < 8, started\n")
    assert run(program).passed


def test_a_huge_allocation_fails_at_once():
    outcome = run("x = bytearray(10 * 2**30)\n")   # 10 GB: refused by RLIMIT_AS before a page is touched
    assert not outcome.passed and "MemoryError" in outcome.detail


def test_unbounded_growth_is_stopped():
    # Filling 256 MiB page by page takes a while on a loaded machine: the limit or the clock stops it first.
    outcome = run("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n",
                  Limits(timeout_s=5.0, memory_bytes=256 << 20))
    assert not outcome.passed
    assert "MemoryError" in outcome.detail or outcome.status == "timed out"
    no_sandbox_processes_left()


def test_network_is_refused():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"):
            outcome = run(program)
            assert not outcome.passed
        with pytest.raises(BlockingIOError):
            listener.accept()   # nothing ever connected
    finally:
        listener.close()


def test_writes_outside_the_working_directory_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "escape.txt"
    for program in (f"open({str(target)!r}, 'w').write('x')\n",
                    f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                    f"import os\nos.remove({str(victim)!r})\n",
                    f"import os\nos.rename({str(victim)!r}, 'mine.txt')\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                    "import os\nos.symlink('/etc', 'etc')\nopen('etc/evil', 'w')\n"):
        outcome = run(program)
        assert not outcome.passed, program
    assert not target.exists()
    assert victim.read_text() == "keep me"


def test_the_working_directory_is_private_and_thrown_away():
    first = run("import os\nopen('note.txt', 'w').write(os.getcwd())\nassert open('note.txt').read()\n")
    assert first.passed
    # a fresh folder each run: the previous run's file is gone
    assert run("import os\nassert not os.path.exists('note.txt')\n").passed


def test_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("MAMBA_MOE_SECRET_FOR_TEST", "do-not-leak")
    assert run("import os\nassert 'MAMBA_MOE_SECRET_FOR_TEST' not in os.environ\n").passed


def test_output_flood_is_bounded():
    outcome = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                  Limits(timeout_s=2.0, file_bytes=1 << 20))
    assert not outcome.passed
    assert len(outcome.detail) <= 2000
