"""Per-sample results on disk: ``samples/<task>.jsonl``, one JSON line per finished sample, appended atomically.

Each batch of finished samples is written with a single ``write`` on an ``O_APPEND`` descriptor and
fsync'ed, so a kill leaves at worst a torn last line; loading drops it (and cuts the file back to the
last complete line before anything is appended). A record carries ``key``, a digest of everything that
made it (request, target, task settings, model identity): a resumed run reuses a record only when its
key matches, and recomputes (and appends anew) a sample whose settings changed. The last record of an
id wins.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def sample_key(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


class SampleCache:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by id; a torn (incomplete or unparsable) tail from an interrupted write is cut off."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        records: dict[str, dict[str, Any]] = {}
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = record
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        return records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(blob)
            while view:   # one write in practice; a short write (a full disk) continues where it stopped
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
