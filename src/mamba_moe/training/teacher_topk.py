"""Teacher top-k log-probabilities precomputed to disk, so a big teacher runs once, not every epoch.

Layout of ``out_dir`` (written whole by :func:`mamba_moe.atomic.atomic_directory`: a reader sees the
complete folder or none, never a manifest listing missing or partial shards):

- ``manifest.json``: format, version, ``k``, the number of windows, the shards (file, first window,
  count), the teacher (source, kind, vocab size) and any caller metadata (e.g. the data folder and
  ``seq_len`` the windows came from).
- ``shard-NNNNN.safetensors``: for each window ``i`` in it, ``values.i`` (l, k) float32 teacher log-probs
  at T = 1 (sorted, largest first), ``indices.i`` (l, k) int32 token ids, ``tokens.i`` (l,) int32 the
  window's own ids (so a reader can check it pairs them with the right window).

Entry ``i`` belongs to the ``i``-th window given to :func:`precompute_teacher_topk` (a 2-D tensor counts
as one window per row): the trainer must feed windows in the same order, e.g. global window ids of a
:class:`~mamba_moe.data.loader.PackedDataset`.

The top-k loss (:func:`topk_distillation_loss`) approximates the full KL: the teacher distribution at
temperature T is ``softmax(logp_topk / T)`` renormalised over its top-k ids (the tail beyond k is dropped,
i.e. treated as 0), and the student's log-probs at T are its full-vocabulary ``log_softmax`` gathered at
those ids. With ``k`` = the vocabulary it equals :func:`~.distill.distillation_loss` exactly; with a
smaller ``k`` it is still >= 0 (the student's gathered probabilities sum to <= 1) and pulls student mass
onto the teacher's top-k set; what is lost is the teacher's ranking inside its tail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_directory
from ..ops.cross_entropy import IGNORE_INDEX
from .distill import DistillationError, Teacher, _ce, _check_shapes, kl_terms, masked_mean

FORMAT = "mamba-moe-teacher-topk"
VERSION = 1
MANIFEST = "manifest.json"


def precompute_teacher_topk(teacher: Teacher, windows: Iterable[Tensor], k: int, out_dir: str | os.PathLike,
                            windows_per_shard: int = 256, metadata: dict[str, Any] | None = None) -> Path:
    """Write the teacher's top-``k`` log-probs (T = 1) and ids for every position of every window.

    ``windows``: 1-D id tensors (one window) or 2-D (one window per row), in the order a trainer will ask
    for them. Returns ``out_dir``; on any error nothing is left at ``out_dir`` (an existing one is kept).
    """
    if not isinstance(k, int) or not 1 <= k <= teacher.vocab_size:
        raise DistillationError(f"k: must be an integer in [1, {teacher.vocab_size}] (got {k!r})")
    if not isinstance(windows_per_shard, int) or windows_per_shard < 1:
        raise DistillationError(f"windows_per_shard: must be a positive integer (got {windows_per_shard!r})")
    out_dir = Path(out_dir)
    shards: list[dict[str, Any]] = []
    with atomic_directory(out_dir) as tmp:
        pending: dict[str, Tensor] = {}
        first = count = 0

        def flush() -> None:
            nonlocal pending, first
            if not pending:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            n = len(pending) // 3
            save_file(pending, str(tmp / name), metadata={"format": FORMAT, "first": str(first), "count": str(n)})
            shards.append({"file": name, "first": first, "count": n})
            first += n
            pending = {}

        for j, window in enumerate(windows):
            if not isinstance(window, Tensor) or window.dim() not in (1, 2) or window.is_floating_point():
                raise DistillationError(f"windows[{j}]: expected a 1-D or 2-D integer tensor, got "
                                        f"{tuple(window.shape) if isinstance(window, Tensor) else type(window)}")
            rows = window.view(1, -1) if window.dim() == 1 else window
            logp = F.log_softmax(teacher.logits(rows.long()), dim=-1)
            values, indices = logp.topk(k, dim=-1)
            for r in range(rows.shape[0]):
                pending[f"values.{count}"] = values[r].contiguous().cpu()
                pending[f"indices.{count}"] = indices[r].to(torch.int32).contiguous().cpu()
                pending[f"tokens.{count}"] = rows[r].to(torch.int32).contiguous().cpu()
                count += 1
                if len(pending) // 3 == windows_per_shard:
                    flush()
        flush()
        manifest = {"format": FORMAT, "version": VERSION, "k": k, "windows": count, "temperature": 1.0,
                    "teacher": {"source": teacher.source, "kind": teacher.kind, "vocab_size": teacher.vocab_size},
                    "shards": shards, "metadata": metadata or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


class TeacherTopK:
    """Reader of a folder written by :func:`precompute_teacher_topk`: ``topk[i] -> (values, indices)``."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)
        path = self.root / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise DistillationError(f"{path}: missing; not a finished teacher top-k folder "
                                    "(re-run `mamba-moe distill topk`)") from err
        except ValueError as err:
            raise DistillationError(f"{path}: not valid JSON ({err})") from err
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DistillationError(f"{path}: format {self.manifest.get('format')!r} v{self.manifest.get('version')}"
                                    f", expected {FORMAT!r} v{VERSION}")
        self.k = int(self.manifest["k"])
        self.shards = self.manifest["shards"]
        expected = 0
        for shard in self.shards:
            if shard["first"] != expected or not (self.root / shard["file"]).exists():
                raise DistillationError(f"{self.root / shard['file']}: missing or out of order in {path}")
            expected += shard["count"]
        if expected != self.manifest["windows"]:
            raise DistillationError(f"{path}: shards hold {expected} windows, manifest says "
                                    f"{self.manifest['windows']}")
        self._open: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return int(self.manifest["windows"])

    def _shard(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(f"teacher top-k window {i} not in [0, {len(self)}) of {self.root}")
        lo, hi = 0, len(self.shards)
        while hi - lo > 1:  # last shard whose first <= i
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.shards[mid]["first"] <= i else (lo, mid)
        if self._open is None or self._open[0] != lo:
            self._open = (lo, safe_open(str(self.root / self.shards[lo]["file"]), framework="pt"))
        return self._open[1]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """(values (l, k) float32 log-probs, indices (l, k) int64) of window ``i``."""
        f = self._shard(i)
        return f.get_tensor(f"values.{i}"), f.get_tensor(f"indices.{i}").long()

    def tokens(self, i: int) -> Tensor:
        """The ids of window ``i`` as it was given to the teacher (int64)."""
        return self._shard(i).get_tensor(f"tokens.{i}").long()

    def batch(self, window_ids: Iterable[int], check_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Stacked entries of ``window_ids``; with ``check_tokens`` (b, l) an error if a window's ids differ."""
        window_ids = list(window_ids)
        items = [self[i] for i in window_ids]
        if check_tokens is not None:
            for row, i in enumerate(window_ids):
                if not torch.equal(self.tokens(i), check_tokens[row].cpu().long()):
                    raise DistillationError(f"{self.root}: window {i} was computed for other tokens than the "
                                            f"batch's row {row}; the windows are not fed in the precomputed order")
        return torch.stack([v for v, _ in items]), torch.stack([ix for _, ix in items])


def topk_distillation_loss(student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, targets: Tensor,
                           alpha: float, temperature: float, ignore_index: int = IGNORE_INDEX
                           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Like :func:`~.distill.distillation_loss`, with the teacher known only on its top-k ids (see module doc).

    ``topk_logprobs``/``topk_indices``: ``(..., k)`` matching the student logits' leading dims.
    """
    _check_shapes(student_logits, targets, "topk_logprobs", topk_logprobs)
    if topk_indices.shape != topk_logprobs.shape:
        raise DistillationError(f"topk_indices: shape {tuple(topk_indices.shape)} differs from topk_logprobs "
                                f"{tuple(topk_logprobs.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise DistillationError(f"alpha: must lie in [0, 1] (got {alpha!r})")
    if not temperature > 0:
        raise DistillationError(f"temperature: must be > 0 (got {temperature!r})")
    vs = student_logits.shape[-1]
    if topk_indices.numel() and int(topk_indices.max()) >= vs:
        raise DistillationError(f"topk_indices: id {int(topk_indices.max())} is outside the student's {vs} rows")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype)
    valid = targets != ignore_index
    count = valid.sum().clamp(min=1).to(dtype)
    ce = _ce(student, targets, count, ignore_index)
    log_p = F.log_softmax(topk_logprobs.detach().to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1).gather(-1, topk_indices.to(student.device).long())
    kl = masked_mean(kl_terms(log_p, log_q).sum(-1), valid, count)
    total = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl
    return total, {"ce": ce.detach(), "kl": kl.detach()}
