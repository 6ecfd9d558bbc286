"""``TrainConfig``: everything a training run needs, one YAML file, validated field by field.

Unknown keys (also in dotted command-line overrides) are errors that suggest the closest field, so a typo
costs seconds, not a training run.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, MambaMoEConfig, get_preset

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "fp32", "bf16")
DATA_SOURCES = ("stdlib", "shards", "chat")
PARALLEL = ("auto", "ddp", "fsdp")
COMPILE = ("auto", "none", "blocks", "blocks-cudagraphs", "model")


def _unknown(key: str, names: list[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, names, n=1)
    return ConfigError(f"{where}{key}: unknown key" + (f"; did you mean {hint[0]!r}?" if hint else ""))


@dataclass
class ModelSpec:
    """A preset name or a model-config file (YAML/config.json), plus field overrides."""

    preset: str | None = "mamba-moe-small"
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> MambaMoEConfig:
        if self.config:
            base = MambaMoEConfig.load(self.config)
            return base.replace(**self.overrides) if self.overrides else base
        if not self.preset:
            raise ConfigError("model: give a preset name or a config path")
        return get_preset(self.preset, **self.overrides)


@dataclass
class DataSpec:
    """Prepared shards (``path``); ``stdlib``: the embedded corpus, tokenized and prepared on first use; or
    ``chat``: JSONL chats (``messages`` lists) for supervised fine-tuning, loss on assistant tokens only."""

    source: str = "stdlib"                # "stdlib", "shards" or "chat"
    path: str | list[str] | None = None   # shards folder (shards) / where stdlib shards go / chat JSONL file(s)
    tokenizer: str | None = None          # tokenizer dir or .gguf (default: manifest's / --checkpoint's / trained)
    vocab_size: int = 8192                # stdlib tokenizer size (when no tokenizer is given)
    max_docs: int | None = None           # cap on stdlib files or chats (tests, quick demos)
    val_fraction: float = 0.02            # stdlib and chat: share held out for validation
    messages_field: str = "messages"      # chat: the JSONL field holding the message list
    pack: bool = False                    # chat: several chats per row (False: one chat per row, padded)
    isolate_documents: bool = False       # stdlib/shards: each packed document computed alone (document_ids)


@dataclass
class DistillSpec:
    """Logit distillation: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)."""

    teacher: str = ""                     # HF dir, .gguf, one of our checkpoints, or "smollm2"
    alpha: float = 0.5
    temperature: float = 2.0
    topk_dir: str | None = None           # precomputed teacher top-k (written on first use, then reused)
    topk: int = 32                        # k when topk_dir is written


@dataclass
class QATSpec:
    """Quantization-aware training: group-wise symmetric fake quantization of linear weights (STE)."""

    bits: int = 4
    group_size: int = 32


@dataclass
class DomainRoutingSpec:
    """Domain-guided routing: router cross-entropy toward a preferred expert per data domain, times ``coef``."""

    coef: float = 0.01
    experts: dict[str, int] = field(default_factory=dict)   # domain name -> routed expert index


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    seq_len: int = 256
    batch_size: int = 8                   # per optimizer micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    schedule: str = "cosine"
    decay_fraction: float = 0.2           # WSD: share of max_steps spent decaying at the end
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    max_steps: int = 300
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    output: str = "runs/demo"
    seed: int = 0
    dtype: str = "auto"                   # auto = bf16 autocast on CUDA, fp32 on CPU
    # torch.compile on CUDA (ignored on CPU): auto = blocks; blocks = each layer compiled on its own (identical
    # layers share one graph; 1.8x the eager step of the 300M at 8k on an H100, docs/benchmarks.md);
    # blocks-cudagraphs = the same, each layer replayed as CUDA graphs (no launch gaps; more memory, one
    # graph per input shape: for fixed-shape pre-training); model = the whole forward; none.
    # true / false still read as blocks / none.
    compile: str = "auto"
    device: str = "auto"
    threads: int = 0                      # CPU threads for torch; 0 = torch's default (one per core)
    progress: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 64
    init_from: str | None = None          # start from these weights (`--checkpoint DIR`); fresh optimizer/step
    distributed: str = "auto"             # with torchrun: ddp | fsdp (FSDP2 fully_shard) | auto
    activation_checkpointing: bool = False
    tensorboard: bool = False             # also write <output>/tensorboard event files
    distill: DistillSpec | None = None
    qat: QATSpec | None = None
    domain_routing: DomainRoutingSpec | None = None

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _build(cls, getattr(self, name), f"{name}."))
        self.validate()

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "save_every", "keep_last", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer (got {v!r})")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"threads: must be a non-negative integer (got {self.threads!r})")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup: must be a non-negative integer (got {self.warmup!r})")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be a number >= 0 (got {getattr(self, name)!r})")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: {self.min_lr} exceeds lr {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: need two numbers in [0, 1) (got {self.betas!r})")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction: must be in (0, 1] (got {self.decay_fraction!r})")
        for name, allowed in (("schedule", SCHEDULES), ("dtype", DTYPES)):
            v = getattr(self, name)
            if v not in allowed:
                hint = difflib.get_close_matches(str(v), allowed, n=1)
                raise ConfigError(f"{name}: {v!r} is not one of {list(allowed)}"
                                  + (f"; did you mean {hint[0]!r}?" if hint else ""))
        _choice("data.source", self.data.source, DATA_SOURCES)
        _choice("distributed", self.distributed, PARALLEL)
        if isinstance(self.compile, bool):
            self.compile = "blocks" if self.compile else "none"
        _choice("compile", self.compile, COMPILE)
        if self.compile == "blocks-cudagraphs" and self.grad_accum > 1:
            # An H100 run with two micro-batches failed inside the backward ("accessing tensor output of
            # CUDAGraphs that has been overwritten"): most likely the first micro-batch's parameter
            # gradients, left in graph memory as .grad, are overwritten by the next replay.
            raise ConfigError(f"compile: blocks-cudagraphs needs grad_accum: 1 (got {self.grad_accum}); raise "
                              "batch_size instead, or use compile: blocks")
        if self.data.source in ("shards", "chat") and not self.data.path:
            raise ConfigError(f"data.path: required when data.source is {self.data.source!r}")
        for name in ("activation_checkpointing", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false (got {getattr(self, name)!r})")
        if self.distill is not None:
            d = self.distill
            if not isinstance(d.teacher, str) or not d.teacher:
                raise ConfigError("distill.teacher: required (a model directory, a .gguf file, or 'smollm2')")
            if not 0 <= d.alpha <= 1:
                raise ConfigError(f"distill.alpha: must be in [0, 1] (got {d.alpha!r})")
            if not d.temperature > 0:
                raise ConfigError(f"distill.temperature: must be > 0 (got {d.temperature!r})")
            if not isinstance(d.topk, int) or d.topk < 1:
                raise ConfigError(f"distill.topk: must be a positive integer (got {d.topk!r})")
        if self.distill is not None and (self.data.pack or self.data.isolate_documents):
            # The student would see each document alone while the teacher reads the whole packed row.
            raise ConfigError("distill: not supported with data.pack or data.isolate_documents (the teacher "
                              "reads whole rows); use one chat per row, or plain pre-training windows")
        if self.qat is not None:
            if self.qat.bits not in (4, 8):
                raise ConfigError(f"qat.bits: must be 4 or 8 (got {self.qat.bits!r})")
            gs = self.qat.group_size
            if not isinstance(gs, int) or isinstance(gs, bool) or gs < 2 or gs % 2:
                raise ConfigError(f"qat.group_size: must be an even integer >= 2 (got {gs!r}); 32 matches "
                                  "GGUF's Q4_0/Q8_0 blocks")
        if self.domain_routing is not None:
            r = self.domain_routing
            if not r.coef >= 0:
                raise ConfigError(f"domain_routing.coef: must be >= 0 (got {r.coef!r})")
            if not isinstance(r.experts, dict) or not r.experts:
                raise ConfigError("domain_routing.experts: map at least one data domain to an expert index")
            for dom, idx in r.experts.items():
                if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                    raise ConfigError(f"domain_routing.experts.{dom}: must be an expert index >= 0 (got {idx!r})")

    # ---- I/O -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read YAML at ``path`` and apply ``key=value`` overrides (dotted keys, YAML-typed values)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: training config not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = apply_overrides(data, overrides or [])
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))


_SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "distill": DistillSpec, "qat": QATSpec,
                              "domain_routing": DomainRoutingSpec}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown(key, names, where)
    data = {k: _as_float(v, f"{where}{k}") if _float_field(cls, k) else v for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _float_field(cls: type, name: str) -> bool:
    return any(f.name == name and str(f.type) in ("float", "float | None") for f in dataclasses.fields(cls))


def _as_float(value: Any, name: str) -> Any:
    """YAML 1.1 (PyYAML) reads ``3e-4`` as a string; accept it as the number it obviously is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` pairs set nested keys; values parse as YAML (``lr=1e-3``, ``compile=true``).

    Keys are checked against the dataclasses (``model.overrides.*`` is free-form: model fields are
    validated by the model config itself).
    """
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        node, cls = data, TrainConfig
        for i, part in enumerate(parts):
            if cls is not None:
                fields = {f.name: f for f in dataclasses.fields(cls)}
                if part not in fields:
                    raise _unknown(part, list(fields), ".".join(parts[:i]) + ("." if i else ""))
                cls = _SECTIONS.get(part) if cls is TrainConfig else None
            if i == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, dict) else {}
                node = node[part]
    return data
