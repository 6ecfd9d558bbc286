"""A real ``mamba-moe serve`` process for tests: started on a free port, waited for, stopped afterwards."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The toy weights' seed: MAMBA_MOE_TEST_SEED replays a run (every failure message names it).
TOY_SEED = int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31)))


@contextmanager
def running_server(checkpoint: str | Path, *flags: str, model_name: str = "toy",
                   timeout: float = 120) -> Iterator[tuple[str, object]]:
    """``mamba-moe serve`` on port 0 (the OS picks a free one, read from its first line): yields (base URL,
    an openai client on it) once ``/v1/models`` answers; the process is terminated on exit."""
    import openai

    cmd = [sys.executable, "-m", "mamba_moe", "serve", str(checkpoint), "--port", "0", "--threads", "1",
           "--dtype", "float64", "--model-name", model_name, *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, f"server did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        url = f"http://127.0.0.1:{match.group(1)}/v1"
        threading.Thread(target=proc.stdout.read, daemon=True).start()   # keep draining its log
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=timeout, max_retries=0)
        for _ in range(300):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        yield url, client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
