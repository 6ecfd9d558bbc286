"""``TrainConfig``: everything a training run needs, one YAML file, validated field by field.

Unknown keys (also in dotted command-line overrides) are errors that suggest the closest field, so a typo
costs seconds, not a training run. Every field's type is checked before any comparison
(``mamba_moe.validation``), so ``seed: 1.5`` or ``lr: [1]`` is reported by its name, and infinities and
NaNs are refused wherever a number is expected (``lr: .inf`` once trained a model into NaNs).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write
from ..config import MambaMoEConfig, get_preset
from ..growth.lora import LoraSettings
from ..user_text import InvalidTextError, decode_text
from ..validation import (
    ConfigError,
    build_dataclass,
    check_bool,
    check_choice,
    check_int,
    check_mapping,
    check_number,
    check_str,
    check_str_list,
    unknown_key,
)

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "fp32", "bf16")
DATA_SOURCES = ("stdlib", "shards", "chat")
PARALLEL = ("auto", "ddp", "fsdp")
COMPILE = ("auto", "none", "blocks", "blocks-cudagraphs", "model")
# torch device strings a run can ask for; whether the machine has one is checked when the trainer starts.
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class ModelSpec:
    """A preset name or a model-config file (YAML/config.json), plus field overrides."""

    preset: str | None = "mamba-moe-small"
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "model") -> None:
        check_str(f"{where}.preset", self.preset, optional=True)
        check_str(f"{where}.config", self.config, optional=True)
        check_mapping(self.overrides, f"{where}.overrides")  # its fields are checked by MambaMoEConfig
        for key in self.overrides:
            if not isinstance(key, str):
                raise ConfigError(f"{where}.overrides: keys must be model-config field names (got {key!r})")

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

    def validate(self, where: str = "data") -> None:
        check_choice(f"{where}.source", self.source, DATA_SOURCES)
        if self.source == "chat":
            check_str_list(f"{where}.path", self.path, optional=True, what="a file, a glob or a list of them")
        else:
            check_str(f"{where}.path", self.path, optional=True, what="a folder path")
        if self.source in ("shards", "chat") and not self.path:
            raise ConfigError(f"{where}.path: required when {where}.source is {self.source!r}")
        check_str(f"{where}.tokenizer", self.tokenizer, optional=True)
        check_int(f"{where}.vocab_size", self.vocab_size, minimum=1)
        check_int(f"{where}.max_docs", self.max_docs, minimum=1, optional=True)
        check_number(f"{where}.val_fraction", self.val_fraction, minimum=0, maximum=1, max_open=True)
        check_str(f"{where}.messages_field", self.messages_field)
        check_bool(f"{where}.pack", self.pack)
        check_bool(f"{where}.isolate_documents", self.isolate_documents)


@dataclass
class DistillSpec:
    """Logit distillation: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)."""

    teacher: str = ""                     # HF dir, .gguf, one of our checkpoints, or "smollm2"
    alpha: float = 0.5
    temperature: float = 2.0
    topk_dir: str | None = None           # teacher top-k written by `mamba-moe distill topk` (read, never written)
    topk: int | None = None               # expected k of topk_dir (checked against its manifest; null: any)

    def validate(self, where: str = "distill") -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError(f"{where}.teacher: required (a model directory, a .gguf file, or 'smollm2')")
        check_number(f"{where}.alpha", self.alpha, minimum=0, maximum=1)
        check_number(f"{where}.temperature", self.temperature, minimum=0, min_open=True)
        check_str(f"{where}.topk_dir", self.topk_dir, optional=True)
        check_int(f"{where}.topk", self.topk, minimum=1, optional=True)


@dataclass
class QATSpec:
    """Quantization-aware training: group-wise symmetric fake quantization of linear weights (STE)."""

    bits: int = 4
    group_size: int = 32

    def validate(self, where: str = "qat") -> None:
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ConfigError(f"{where}.bits: must be 4 or 8 (got {self.bits!r})")
        gs = self.group_size
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 2 or gs % 2:
            raise ConfigError(f"{where}.group_size: must be an even integer >= 2 (got {gs!r}); 32 matches "
                              "GGUF's Q4_0/Q8_0 blocks")


@dataclass
class DomainRoutingSpec:
    """Domain-guided routing: router cross-entropy toward a preferred expert per data domain, times ``coef``."""

    coef: float = 0.01
    experts: dict[str, int] = field(default_factory=dict)   # domain name -> routed expert index

    def validate(self, where: str = "domain_routing") -> None:
        check_number(f"{where}.coef", self.coef, minimum=0)
        if not isinstance(self.experts, dict) or not self.experts:
            raise ConfigError(f"{where}.experts: map at least one data domain to an expert index")
        for dom, idx in self.experts.items():
            check_int(f"{where}.experts.{dom}", idx, minimum=0)


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
    device: str = "auto"                  # auto | cpu | cuda | cuda:N (| mps)
    threads: int = 0                      # CPU threads for torch; 0 = torch's default (one per core)
    progress: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 64               # 0 = no sample at the end of `mamba-moe train`
    init_from: str | None = None          # start from these weights (`--checkpoint DIR`); fresh optimizer/step
    distributed: str = "auto"             # with torchrun: ddp | fsdp (FSDP2 fully_shard) | auto
    activation_checkpointing: bool = False
    tensorboard: bool = False             # also write <output>/tensorboard event files
    distill: DistillSpec | None = None
    qat: QATSpec | None = None
    domain_routing: DomainRoutingSpec | None = None
    # LoRA (growth/lora.py, PEFT): adapters on the --checkpoint base, which stays frozen; rank, alpha, dropout,
    # targets by our module names (in_proj, out_proj, q/k/v/o_proj, gate/up/down_proj, experts), layers.
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _build(cls, getattr(self, name), f"{name}."))
        self.validate()

    def validate(self) -> None:
        for name, cls in _SECTIONS.items():  # a section given as 5 or a list never reaches the checks below
            value = getattr(self, name)
            if not isinstance(value, cls) and not (value is None and name not in ("model", "data")):
                raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "save_every", "keep_last", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("threads", "warmup", "sample_tokens"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("seed", self.seed, minimum=0)
        if self.seed >= 2**32:  # numpy's seed range
            raise ConfigError(f"seed: must be below 2**32 (got {self.seed})")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            check_number(name, getattr(self, name), minimum=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: {self.min_lr} exceeds lr {self.lr}")
        if (not isinstance(self.betas, list | tuple) or len(self.betas) != 2
                or not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1
                           for b in self.betas)):
            raise ConfigError(f"betas: need two numbers in [0, 1) (got {self.betas!r})")
        check_number("decay_fraction", self.decay_fraction, minimum=0, maximum=1, min_open=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("distributed", self.distributed, PARALLEL)
        if isinstance(self.compile, bool):
            self.compile = "blocks" if self.compile else "none"
        check_choice("compile", self.compile, COMPILE)
        if self.compile == "blocks-cudagraphs" and self.grad_accum > 1:
            # An H100 run with two micro-batches failed inside the backward ("accessing tensor output of
            # CUDAGraphs that has been overwritten"): most likely the first micro-batch's parameter
            # gradients, left in graph memory as .grad, are overwritten by the next replay.
            raise ConfigError(f"compile: blocks-cudagraphs needs grad_accum: 1 (got {self.grad_accum}); raise "
                              "batch_size instead, or use compile: blocks")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ConfigError(f"device: {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        check_str("output", self.output, what="a directory path")
        check_str("init_from", self.init_from, optional=True, what="a checkpoint directory")
        if not isinstance(self.sample_prompt, str) or (self.sample_tokens and not self.sample_prompt):
            raise ConfigError(f"sample_prompt: must be a non-empty string when sample_tokens > 0 (got "
                              f"{self.sample_prompt!r})")
        for name in ("activation_checkpointing", "tensorboard", "progress"):
            check_bool(name, getattr(self, name))
        self.model.validate("model")
        self.data.validate("data")
        for name in ("distill", "qat", "domain_routing", "lora"):
            if getattr(self, name) is not None:
                getattr(self, name).validate(name)
        if self.lora is not None:
            # QAT parametrizes the very weights LoRA wraps; domain routing trains the router, which LoRA freezes;
            # FSDP would shard PEFT's layers (untested): each is refused rather than half working.
            for name, on in (("qat", self.qat is not None), ("domain_routing", self.domain_routing is not None),
                             ("distributed", self.distributed == "fsdp")):
                if on:
                    raise ConfigError(f"lora: not supported with {name}" + (": fsdp" if name == "distributed" else "")
                                      + " (train the adapter without it)")
        if self.distill is not None and (self.data.pack or self.data.isolate_documents):
            # The student would see each document alone while the teacher reads the whole packed row.
            raise ConfigError("distill: not supported with data.pack or data.isolate_documents (the teacher "
                              "reads whole rows); use one chat per row, or plain pre-training windows")

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
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory; give a training config file (YAML), e.g. "
                              "configs/train/demo.yaml")
        try:
            data = yaml.safe_load(decode_text(path.read_bytes(), str(path))) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the training config ({err.strerror or err})") from err
        except InvalidTextError as err:
            raise ConfigError(str(err)) from None
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
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "distill": DistillSpec, "qat": QATSpec,
                              "domain_routing": DomainRoutingSpec, "lora": LoraSettings}


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` with unknown keys named and YAML's ``3e-4``-as-a-string read as a number; the
    values themselves are checked by the dataclass's ``validate``."""
    return build_dataclass(cls, data, where)


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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.__class__.__name__}); "
                              "quote text values, e.g. sample_prompt='class '") from None
        parts = key.strip().split(".")
        node, cls = data, TrainConfig
        for i, part in enumerate(parts):
            if cls is not None:
                fields = [f.name for f in dataclasses.fields(cls)]
                if part not in fields:
                    raise unknown_key(part, fields, ".".join(parts[:i]))
                cls = _SECTIONS.get(part) if cls is TrainConfig else None
            if i == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, dict) else {}
                node = node[part]
    return data
