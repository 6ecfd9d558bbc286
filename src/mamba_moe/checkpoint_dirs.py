"""Which directory holds a usable checkpoint: the one place that decides a checkpoint is good.

``train --checkpoint``, ``train --resume``, ``generate``, ``chat`` and ``serve`` all accept the same three
forms — a step directory, a run's ``checkpoints/`` folder, or the run folder itself — and all of them
reject the same damaged files. Checkpoints are renamed into place only when written, so damage means a
power loss before the data reached the disk, a full disk outside our control, or a hand-copied directory:
a truncated ``model.safetensors`` or ``trainer_state.pt`` must be named, never a raw traceback.

The checks read file headers and sizes only (a safetensors header is JSON; ``torch.save`` writes a zip
archive whose central directory sits at the end of the file), so they cost milliseconds on any size of
checkpoint and need neither torch nor the model. Neutral: nothing here imports training or inference.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")

# Bytes per element of each safetensors dtype; a dtype missing here gets no size check, only bounds.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
# A safetensors header larger than this is corrupt rather than real (the format itself caps it at 100 MB).
_MAX_HEADER = 100_000_000
# JSON side files that, when present, must parse: a half-written one breaks loading the tokenizer/model.
_JSON_FILES = (CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A path that is not, or holds no, complete checkpoint; the message names the path and what is wrong."""


def step_number(path: Path) -> int | None:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(root: str | Path) -> list[Path]:
    """``step-N`` directories directly under ``root``, oldest first, complete or not (temporaries, whose
    names start with a dot, never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(n, p) for p in root.iterdir() if (n := step_number(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (truncated, bad header, tensors past the end), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes, no header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                return f"{path.name} is truncated or corrupt (header of {header_len} bytes in a {size}-byte file)"
            header = json.loads(fh.read(header_len))
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} has a corrupt header (not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} has a corrupt header (not a JSON object)"
    data_size = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"{path.name} has a corrupt header (entry {name!r})"
        if not 0 <= begin <= stop:
            return f"{path.name} has a corrupt header (tensor {name!r}: offsets {begin}..{stop})"
        if dtype in _DTYPE_BYTES:
            numel = 1
            for d in shape:
                numel *= d
            if stop - begin != numel * _DTYPE_BYTES[dtype]:
                return (f"{path.name} has a corrupt header (tensor {name!r}: {stop - begin} bytes for "
                        f"{dtype} {shape})")
        end = max(end, stop)
    if end > data_size:
        return f"{path.name} is truncated ({size} bytes; its tensors need {8 + header_len + end})"
    if end < data_size:
        return f"{path.name} is corrupt ({data_size - end} bytes after the last tensor)"
    return None


def torch_archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole ``torch.save`` archive (a zip: its directory is at the end, so a truncated
    file has none, and every member must lie inside the file), or None."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    except (zipfile.BadZipFile, ValueError, EOFError):
        return f"{path.name} is truncated or corrupt (not a complete torch.save archive)"
    if not members:
        return f"{path.name} is corrupt (an empty archive)"
    for info in members:
        if info.header_offset + info.compress_size > size:
            return f"{path.name} is truncated (member {info.filename} runs past the end of the file)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is truncated or corrupt (not valid JSON)"
    return None


def incomplete_reason(step_dir: str | Path, *, resume: bool = False) -> str | None:
    """What makes ``step_dir`` unusable — a missing or damaged file, by name — or None when it is complete.

    Complete means ``config.json`` and ``model.safetensors`` present and whole, the tokenizer files that are
    present parseable, and with ``resume`` also ``trainer_state.pt`` whole (an inference-only directory, such
    as one ``convert`` wrote, has no trainer state and is still a complete model)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "not a directory"
    required = (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME) if resume else (CONFIG_NAME, WEIGHTS_NAME)
    missing = [name for name in required if not (step_dir / name).is_file()]
    if missing:
        return f"missing {' and '.join(missing)}"
    for name in _JSON_FILES:
        if (step_dir / name).exists() and (problem := _json_problem(step_dir / name)):
            return problem
    if problem := safetensors_problem(step_dir / WEIGHTS_NAME):
        return problem
    if resume and (problem := torch_archive_problem(step_dir / STATE_NAME)):
        return problem
    return None


def is_complete(step_dir: str | Path, *, resume: bool = False) -> bool:
    """Whether ``step_dir`` holds a whole checkpoint (see ``incomplete_reason``)."""
    return incomplete_reason(step_dir, resume=resume) is None


def _looks_like_model_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def newest_complete(root: str | Path, *, resume: bool = False,
                    notify: Callable[[str], None] | None = _stderr) -> Path | None:
    """The newest complete ``step-N`` directly under ``root``, or None when there is none; each newer damaged
    one skipped on the way is reported through ``notify`` (stderr by default; None for silence)."""
    for candidate in reversed(step_dirs(root)):
        reason = incomplete_reason(candidate, resume=resume)
        if reason is None:
            return candidate
        if notify is not None:
            notify(f"skipping checkpoint {candidate}: {reason}; trying the previous one")
    return None


def resolve_model_dir(path: str | Path, *, resume: bool = False,
                      notify: Callable[[str], None] | None = _stderr) -> Path:
    """The complete checkpoint directory ``path`` names.

    ``path`` may be a checkpoint itself (it must then be complete: no silent substitution of another one),
    a ``checkpoints/`` folder, or a run's output folder; for the last two the newest complete ``step-N`` is
    returned, damaged newer ones reported through ``notify``. ``resume`` also requires ``trainer_state.pt``.
    Raises ``CheckpointError`` naming the path and the missing or damaged file otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a checkpoint directory, e.g. "
                              "runs/stage1/checkpoints/step-040000, or a run's output folder)")
    if _looks_like_model_dir(path):
        reason = incomplete_reason(path, resume=resume)
        if reason is not None:
            raise CheckpointError(f"{path}: not a complete checkpoint: {reason}")
        return path
    seen: list[Path] = []
    for root in (path, path / "checkpoints"):
        found = newest_complete(root, resume=resume, notify=notify)
        if found is not None:
            return found
        seen += step_dirs(root)
    if seen:
        newest = seen[-1]
        raise CheckpointError(f"{path}: no complete checkpoint among {len(seen)} step directories (the newest, "
                              f"{newest.name}: {incomplete_reason(newest, resume=resume)})")
    raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG_NAME} + {WEIGHTS_NAME}) and no step-N "
                          "checkpoint under it or under its checkpoints/")
