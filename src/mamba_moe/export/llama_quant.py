"""GGUF file types and the quantized ones made by llama.cpp's own quantizer (through llama-cpp-python).

f32, f16 and bf16 are written directly by ``gguf.GGUFWriter``. The quantized types are made the way
llama.cpp users make them: an f32 GGUF goes through ``llama_model_quantize``, so the per-tensor choices
(f32 norms / router / SSM tensors, Q6_K for some ``ffn_down`` / ``attn_v`` / ``output`` in ``*_k_m``) are
llama.cpp's, not ours.

Tier 2 of exportability: a quant type packs each row in blocks (32 values for q8_0 / q4_0, super-blocks of
256 for the K-quants). llama.cpp would silently fall back to another type for a tensor whose rows do not
fit; we refuse that type instead and name the tensor and the types that do fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .gguf_tensors import GGUFTensor

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


@dataclass(frozen=True)
class FileType:
    name: str
    llama_ftype: int          # llama_ftype / gguf.LlamaFileType value
    block: int                # row length must be a multiple of this (1 = any)
    native: bool              # written by GGUFWriter (True) or by llama.cpp's quantizer (False)


FILE_TYPES: dict[str, FileType] = {t.name: t for t in (
    FileType("f32", 0, 1, True),
    FileType("f16", 1, 1, True),
    FileType("bf16", 32, 1, True),
    FileType("q8_0", 7, 32, False),
    FileType("q4_0", 2, 32, False),
    FileType("q4_k_m", 15, 256, False),
    FileType("q5_k_m", 17, 256, False),
    FileType("q6_k", 18, 256, False),
)}


def file_type(name: str) -> FileType:
    if name not in FILE_TYPES:
        raise ExportError(f"--type {name!r}: not one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[name]


def quant_type_blockers(tensors: Iterable[GGUFTensor], kind: FileType) -> list[str]:
    """One message per tensor whose rows ``kind`` cannot pack (empty: the type fits every tensor)."""
    if kind.block == 1:
        return []
    problems = []
    for t in tensors:
        row = t.data.shape[-1]
        if t.is_matrix and row % kind.block:
            problems.append(f"{t.name} ({t.source}) has rows of {row} values, not a multiple of {kind.block}")
    return problems


def check_quant_type(tensors: list[GGUFTensor], kind: FileType) -> None:
    problems = quant_type_blockers(tensors, kind)
    if not problems:
        return
    fits = [t.name for t in FILE_TYPES.values() if not quant_type_blockers(tensors, t)]
    shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
    raise ExportError(f"--type {kind.name}: the model's shapes do not allow it ({kind.name} packs rows in blocks "
                      f"of {kind.block}): {shown}. Types that fit this model: {', '.join(fits)}")


def import_llama_cpp():
    """The ``llama_cpp`` module, or an error that says how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ExportError(f"this needs llama.cpp through {LLAMA_CPP_PYTHON} (pip install 'mamba-moe[export]'; it "
                          "builds llama.cpp from source, several minutes on 2 cores)") from err
    return llama_cpp


@contextlib.contextmanager
def captured_native_output() -> Iterator[list[str]]:
    """Send the process's stdout/stderr file descriptors (where llama.cpp logs) to a temporary file; the yielded
    list holds that text after the block, for error messages."""
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield text
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", "replace"))


def llama_quantize(source: Path, target: Path, kind: FileType, threads: int = 0) -> None:
    """Quantize the GGUF file ``source`` into ``target`` with llama.cpp's ``llama_model_quantize``."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = kind.llama_ftype
    params.nthread = threads
    with captured_native_output() as log:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0 or not target.exists():
        tail = "\n".join(log[0].strip().splitlines()[-8:]) if log else ""
        raise ExportError(f"--type {kind.name}: llama.cpp's quantizer failed (code {rc}) on {source.name}:\n{tail}")
