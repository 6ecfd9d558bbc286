"""Where the evaluation data lives: ``../shared/data`` beside the repository, or wherever you say.

Lookup order for the data folder: an explicit ``data_dir`` (``--data-dir``), the ``MAMBA_MOE_EVAL_DATA``
environment variable, then ``../shared/data`` relative to the repository root (this source tree's
``src/..``) and relative to the working directory. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import EvalError

ENV_VAR = "MAMBA_MOE_EVAL_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[3]


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR])]
    return [_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def data_file(relative: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``relative`` (e.g. ``gsm8k/test.jsonl``) in the data folder, or an error saying where it looked."""
    tried = []
    for root in candidate_dirs(data_dir):
        path = root / relative
        if path.is_file():
            return path
        tried.append(str(path))
    raise EvalError(f"{relative}: not found (looked at {', '.join(tried)}); point --data-dir or the {ENV_VAR} "
                    "environment variable at the folder holding gsm8k/ and mt_bench/")


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file (optionally gzipped); a bad line is an error naming the file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise EvalError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise EvalError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield record
