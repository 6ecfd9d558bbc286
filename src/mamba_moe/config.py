"""Model configuration: one dataclass, validated, with named presets and YAML / HF-style JSON I/O.

Every field has one meaning across the whole model; errors name the field they are about, so a typo in
a YAML file is found in seconds rather than after a training run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write
from .user_text import InvalidTextError, decode_text
from .validation import (  # noqa: F401  (ConfigError is re-exported: mamba_moe.config.ConfigError)
    ConfigError,
    build_dataclass,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    check_number,
    coerce_float,
    suggestion,
)

MIXERS = ("mamba", "attention")
FFNS = ("none", "dense", "moe")
ATTENTION_TYPES = ("gqa", "diff", "diff2")
DIFF2_LAMBDA_MODES = ("head", "token")
ROUTERS = ("soft", "topk", "switch")
ACTIVATIONS = ("swiglu", "gelu")

# Keys that HF tooling writes into config.json and that carry no model meaning for us.
_META_KEYS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype"}


_ROPE_SCALING_KEYS = ("type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                      "attention_factor")


@dataclass
class MambaMoEConfig:
    """Architecture of a hybrid Mamba2 / attention / MoE language model.

    The per-layer layout is two lists of length ``n_layers``: ``layer_mixers`` ("mamba" or
    "attention") and ``layer_ffns`` ("none", "dense" or "moe"). Left empty they default to all-Mamba
    mixers and MoE FFNs everywhere.
    """

    vocab_size: int = 32000
    d_model: int = 1024
    n_layers: int = 24
    layer_mixers: list[str] = field(default_factory=list)
    layer_ffns: list[str] = field(default_factory=list)

    # Embeddings: 0 = a plain vocab x d_model table; r > 0 = vocab x r table followed by r -> d_model.
    embedding_rank: int = 0
    tie_word_embeddings: bool = True

    # Mamba2 (SSD) mixer.
    ssm_state_size: int = 128
    ssm_expand: int = 2
    ssm_head_dim: int = 64
    ssm_ngroups: int = 1
    ssm_conv_kernel: int = 4
    ssm_conv_bias: bool = True
    ssm_chunk_size: int = 128
    ssm_dt_min: float = 0.001
    ssm_dt_max: float = 0.1
    ssm_dt_init_floor: float = 1e-4
    ssm_a_init_min: float = 1.0
    ssm_a_init_max: float = 16.0

    # Attention mixer.
    attn_type: str = "gqa"
    attn_num_heads: int = 16
    attn_num_kv_heads: int = 1
    attn_head_dim: int | None = None
    diff2_lambda: str = "head"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192

    # Feed-forward layers.
    ffn_activation: str = "swiglu"
    ffn_hidden_size: int = 2816
    moe_num_experts: int = 4
    moe_expert_hidden_size: int = 512
    moe_shared_expert_hidden_size: int = 0
    moe_router: str = "soft"
    moe_top_k: int = 1
    moe_capacity_factor: float = 1.25
    moe_min_capacity: int = 4
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001

    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # Defaults and copies only for values of the right shape; anything else is left for validate() to
        # name (``list(5)`` here would surface as a bare TypeError).
        if isinstance(self.n_layers, int) and not isinstance(self.n_layers, bool):
            if not self.layer_mixers:
                self.layer_mixers = ["mamba"] * self.n_layers
            if not self.layer_ffns:
                self.layer_ffns = ["moe"] * self.n_layers
        for name in ("layer_mixers", "layer_ffns"):
            if isinstance(getattr(self, name), list | tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def ssm_d_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def ssm_num_heads(self) -> int:
        return self.ssm_d_inner // self.ssm_head_dim

    @property
    def ssm_conv_dim(self) -> int:
        return self.ssm_d_inner + 2 * self.ssm_ngroups * self.ssm_state_size

    @property
    def head_dim(self) -> int:
        """Width of one query/key head (for ``diff`` each of its two sub-heads)."""
        if self.attn_head_dim is not None:
            return self.attn_head_dim
        per_head = self.d_model // self.attn_num_heads
        return per_head // 2 if self.attn_type == "diff" else per_head

    @property
    def effective_top_k(self) -> int:
        """Experts a token is sent to: all for ``soft``, one for ``switch``, ``moe_top_k`` for ``topk``."""
        return {"soft": self.moe_num_experts, "switch": 1}.get(self.moe_router, self.moe_top_k)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{name}: {msg} (got {getattr(self, name)!r})")

        # Types and ranges first, so the consistency checks below compare numbers.
        for name in ("vocab_size", "d_model", "n_layers", "ssm_state_size", "ssm_expand", "ssm_head_dim",
                     "ssm_ngroups", "ssm_conv_kernel", "ssm_chunk_size", "attn_num_heads",
                     "attn_num_kv_heads", "ffn_hidden_size", "moe_num_experts", "moe_expert_hidden_size",
                     "moe_top_k", "max_position_embeddings"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("embedding_rank", "moe_shared_expert_hidden_size", "moe_min_capacity"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("attn_head_dim", self.attn_head_dim, minimum=1, optional=True)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            check_int(name, getattr(self, name), minimum=0, optional=True)
        for name in ("rms_norm_eps", "moe_capacity_factor", "rope_theta", "initializer_range", "ssm_dt_min",
                     "ssm_dt_max", "ssm_dt_init_floor", "ssm_a_init_min", "ssm_a_init_max"):
            check_number(name, getattr(self, name), minimum=0, min_open=True)
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
            check_number(name, getattr(self, name), minimum=0)
        for name in ("tie_word_embeddings", "ssm_conv_bias"):
            check_bool(name, getattr(self, name))
        if self.ssm_dt_min > self.ssm_dt_max:
            fail("ssm_dt_min", f"exceeds ssm_dt_max={self.ssm_dt_max}")
        if self.ssm_a_init_min > self.ssm_a_init_max:
            fail("ssm_a_init_min", f"exceeds ssm_a_init_max={self.ssm_a_init_max}")

        for name in ("layer_mixers", "layer_ffns"):
            value = getattr(self, name)
            if not isinstance(value, list):
                fail(name, "must be a list with one entry per layer")
            if len(value) != self.n_layers:
                raise ConfigError(f"{name}: needs one entry per layer, n_layers={self.n_layers}, "
                                  f"got {len(value)}")
        for i, kind in enumerate(self.layer_mixers):
            check_choice(f"layer_mixers[{i}]", kind, MIXERS)
        for i, kind in enumerate(self.layer_ffns):
            check_choice(f"layer_ffns[{i}]", kind, FFNS)
        check_choice("attn_type", self.attn_type, ATTENTION_TYPES)
        check_choice("diff2_lambda", self.diff2_lambda, DIFF2_LAMBDA_MODES)
        check_choice("moe_router", self.moe_router, ROUTERS)
        check_choice("ffn_activation", self.ffn_activation, ACTIVATIONS)

        if self.ssm_d_inner % self.ssm_head_dim:
            fail("ssm_head_dim", f"must divide d_inner = ssm_expand * d_model = {self.ssm_d_inner}")
        if self.ssm_num_heads % self.ssm_ngroups:
            fail("ssm_ngroups", f"must divide the number of SSM heads ({self.ssm_num_heads})")
        if self.moe_router == "topk" and self.moe_top_k > self.moe_num_experts:
            raise ConfigError(f"moe_num_experts: {self.moe_num_experts} experts cannot serve "
                              f"moe_top_k={self.moe_top_k}; need moe_num_experts >= moe_top_k")
        if self.embedding_rank >= self.d_model:
            fail("embedding_rank", f"a factorized embedding needs rank < d_model ({self.d_model}); use 0 "
                 "for a plain embedding")
        if self.embedding_rank and not self.tie_word_embeddings:
            fail("tie_word_embeddings", "factorized embeddings are always tied to the output head")

        if self.rope_scaling is not None:
            check_mapping(self.rope_scaling, "rope_scaling")
        if "attention" in self.layer_mixers:
            if self.attn_head_dim is None:
                split = 2 * self.attn_num_heads if self.attn_type == "diff" else self.attn_num_heads
                if self.d_model % split:
                    fail("attn_num_heads", f"d_model={self.d_model} is not divisible by the number of "
                         f"heads ({split}{' = 2 per differential head' if self.attn_type == 'diff' else ''}); "
                         "set attn_head_dim explicitly or change attn_num_heads")
            if self.head_dim % 2:
                fail("attn_head_dim", f"must be even for rotary embeddings (resolved to {self.head_dim})")
            if self.attn_num_heads % self.attn_num_kv_heads:
                fail("attn_num_kv_heads", f"must divide attn_num_heads={self.attn_num_heads}")
            self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        check_keys(rs, _ROPE_SCALING_KEYS, "rope_scaling")
        if rs.get("type") != "yarn":
            raise ConfigError(f"rope_scaling.type: only 'yarn' is supported (got {rs.get('type')!r})")
        for key in ("factor", "beta_fast", "beta_slow", "attention_factor"):
            if key in rs:
                rs[key] = coerce_float(f"rope_scaling.{key}", rs[key])
        check_number("rope_scaling.factor", rs.get("factor"), minimum=1)
        check_int("rope_scaling.original_max_position_embeddings", rs.get("original_max_position_embeddings"),
                  minimum=1)
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            check_number(f"rope_scaling.{key}", rs.get(key), minimum=0, min_open=True, optional=True)

    # ---- I/O -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MambaMoEConfig:
        data = check_mapping(data, "config")
        if "rope_parameters" in data:  # config.json's form (see to_hf_dict)
            rope = dict(check_mapping(data.pop("rope_parameters") or {}, "rope_parameters"))
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope.pop("rope_theta"))
            kind = rope.pop("rope_type", rope.pop("type", "default"))
            data["rope_scaling"] = None if kind == "default" and not rope else {"type": kind, **rope}
        return build_dataclass(cls, data, ignore=_META_KEYS)

    def to_hf_dict(self) -> dict[str, Any]:
        """The dictionary written as ``config.json`` beside the weights (HF conventions).

        RoPE settings go under transformers 5's ``rope_parameters`` (``rope_type`` instead of ``type``):
        tools that read an unknown model's config.json generically (``AutoTokenizer.from_pretrained`` on a
        checkpoint directory does) fail on a legacy ``rope_scaling`` key. ``from_dict`` reads both.
        """
        data = self.to_dict()
        scaling = data.pop("rope_scaling")
        rope = {"rope_type": "default"} if scaling is None else {
            "rope_type": scaling["type"], **{k: v for k, v in scaling.items() if k != "type"}}
        data["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        return {"model_type": "mamba_moe", "architectures": ["MambaMoEForCausalLM"], **data}

    def save(self, path: str | Path) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else) to ``path``, atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_hf_dict(), indent=2) + "\n"
        atomic_write(path, text)

    @classmethod
    def load(cls, path: str | Path) -> MambaMoEConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        if not path.is_file():
            raise ConfigError(f"{path}: not a file (give a YAML/JSON config or a directory holding config.json)")
        try:
            text = decode_text(path.read_bytes(), str(path))
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except InvalidTextError as err:
            raise ConfigError(str(err)) from None
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                              f"{err}") from err
        try:
            if isinstance(data, dict) and "preset" in data:  # YAML may start from a preset and override
                base = get_preset(data.pop("preset")).to_dict()
                base.update(data)
                data = base
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def replace(self, **changes: Any) -> MambaMoEConfig:
        return MambaMoEConfig.from_dict({**self.to_dict(), **changes})


# ---- presets ---------------------------------------------------------------------------------------

def _every(n_layers: int, period: int, offset: int) -> list[str]:
    """Mixers with attention on layers offset, offset + period, ... and Mamba2 elsewhere."""
    return ["attention" if i % period == offset else "mamba" for i in range(n_layers)]


def _flagship() -> MambaMoEConfig:
    # Seed 000's phone model, shaped to fit llama.cpp's granitehybrid exactly (docs/architecture.md).
    # 8 diff2 heads (16 query heads after the export's fold), not 16: llama.cpp's decode at 8k context on 2 CPU
    # cores is ~1.4x faster with 8, and at 62.9M training tokens 8 heads were level with 16 (held-out 2.094 vs
    # 2.117, trained side by side; docs/results.md, "Eight attention heads, twice the tokens").
    return MambaMoEConfig(
        vocab_size=32000, d_model=1024, n_layers=24,
        layer_mixers=_every(24, 6, 5), layer_ffns=["moe"] * 24,
        embedding_rank=256, tie_word_embeddings=True,
        ssm_state_size=128, ssm_expand=2, ssm_head_dim=64, ssm_ngroups=1, ssm_conv_kernel=4,
        attn_type="diff2", diff2_lambda="head", attn_num_heads=8, attn_num_kv_heads=1, attn_head_dim=64,
        rope_theta=10000.0, max_position_embeddings=32768,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192,
                      "beta_fast": 32.0, "beta_slow": 1.0},
        ffn_activation="swiglu", moe_num_experts=6, moe_expert_hidden_size=256,
        moe_shared_expert_hidden_size=512, moe_router="soft",
        pad_token_id=0, eos_token_id=1,
    )


def _flagship_dense() -> MambaMoEConfig:
    # The flagship with a dense SwiGLU FFN as wide as its soft MoE's active width (6 x 256 + 512 = 2048), so
    # the same parameters act on each token (less the router): the study's MoE-vs-dense control.
    flagship = _flagship()
    width = flagship.moe_num_experts * flagship.moe_expert_hidden_size + flagship.moe_shared_expert_hidden_size
    return flagship.replace(layer_ffns=["dense"] * flagship.n_layers, ffn_hidden_size=width)


def _mamba_r1() -> MambaMoEConfig:
    # Seed 004's "technical specifications": Mamba blocks alternating with Switch-MoE FFNs.
    return MambaMoEConfig(
        vocab_size=32000, d_model=512, n_layers=12, ssm_state_size=64, ssm_conv_kernel=4, ssm_expand=2,
        ssm_head_dim=64, moe_num_experts=8, moe_expert_hidden_size=2048, moe_router="switch",
        moe_capacity_factor=1.25, moe_min_capacity=4, ffn_activation="gelu", max_position_embeddings=2048,
    )


def _tiny() -> MambaMoEConfig:
    # Small enough for unit tests on 2 CPU cores, yet every component is present.
    return MambaMoEConfig(
        vocab_size=512, d_model=64, n_layers=4, layer_mixers=["mamba", "attention", "mamba", "attention"],
        layer_ffns=["moe"] * 4, embedding_rank=32, ssm_state_size=16, ssm_head_dim=16, ssm_chunk_size=16,
        attn_type="diff2", attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=16,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32.0, "beta_slow": 1.0},
        max_position_embeddings=256, moe_num_experts=4, moe_expert_hidden_size=64,
        moe_shared_expert_hidden_size=64, moe_router="soft",
    )


def _small() -> MambaMoEConfig:
    # The CPU demo model: trains for a few minutes on a laptop.
    return MambaMoEConfig(
        vocab_size=8192, d_model=256, n_layers=8, layer_mixers=_every(8, 4, 3), layer_ffns=["moe"] * 8,
        embedding_rank=128, ssm_state_size=64, ssm_head_dim=32, ssm_chunk_size=64,
        attn_type="diff2", attn_num_heads=4, attn_num_kv_heads=1, attn_head_dim=64,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32.0, "beta_slow": 1.0},
        max_position_embeddings=4096, moe_num_experts=4, moe_expert_hidden_size=256,
        moe_shared_expert_hidden_size=256, moe_router="soft",
    )


def _transformer_baseline() -> MambaMoEConfig:
    # The comparison baseline of bench/train_throughput.py: a Llama-style dense transformer (all attention,
    # multi-head RoPE attention, SwiGLU FFN, untied head), 24 x 1024, 373.9M parameters.
    return MambaMoEConfig(
        vocab_size=32000, d_model=1024, n_layers=24, layer_mixers=["attention"] * 24, layer_ffns=["dense"] * 24,
        embedding_rank=0, tie_word_embeddings=False,
        attn_type="gqa", attn_num_heads=16, attn_num_kv_heads=16, attn_head_dim=64,
        rope_theta=10000.0, max_position_embeddings=32768,
        ffn_activation="swiglu", ffn_hidden_size=2816,
        pad_token_id=0, eos_token_id=1,
    )


PRESETS = {
    "mamba-moe-300m": _flagship,
    "mamba-moe-300m-dense": _flagship_dense,
    "transformer-baseline": _transformer_baseline,
    "mamba-r1": _mamba_r1,
    "mamba-moe-small": _small,
    "mamba-moe-tiny": _tiny,
}


def get_preset(name: str, **overrides: Any) -> MambaMoEConfig:
    """A named preset, optionally with fields overridden (validated like any config)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; known: {sorted(PRESETS)}{suggestion(name, PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config

