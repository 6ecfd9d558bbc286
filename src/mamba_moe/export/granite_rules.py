"""Which configs can be exported to llama.cpp's ``granitehybrid`` GGUF architecture, and why not.

``export_blockers(config)`` lists every reason a config cannot be exported; an empty list means the
exporter can write it. ``export_caveats(config)`` lists what an exportable config gives up (GPU backends
that will not run it; the CPU backend, a phone's, runs every exportable config). Each blocker carries
a stable rule name from ``RULES`` so docs and tests can refer to it. The flagship
preset ``mamba-moe-300m`` is shaped to pass every rule.

Not a rule: llama.cpp uses one RMSNorm epsilon (``attention.layer_norm_rms_epsilon``) for every norm,
including the grouped norm inside the Mamba2 mixer. Our config has a single ``rms_norm_eps`` field for
all norms too, so this constraint always holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MambaMoEConfig

# Stable rule name -> one-line description (listed in the docs).
RULES: dict[str, str] = {
    "ssm_expand": "Mamba2 layers need ssm_expand = 2 (llama.cpp asserts d_inner == 2 * n_embd).",
    "ssm_ngroups": "Mamba2 layers need ssm_ngroups of 1 or 2 "
                   "(llama.cpp asserts d_inner % (n_group * n_embd) == 0).",
    "attention_layer": "Mamba2 layers need at least one attention layer beside them (granitehybrid always "
                       "builds a KV cache, and an empty one aborts llama.cpp).",
    "ffn_uniform": "Every layer needs the same FFN kind, all 'moe' or all 'dense' "
                   "(granitehybrid gives every layer one FFN of one kind).",
    "ffn_activation": "FFNs must use swiglu (granitehybrid only builds silu-gated FFNs).",
    "moe_router": "The 'switch' router has no llama.cpp equivalent "
                  "(capacity dropping, raw top-1 probability scaling).",
    "attn_type": "attn_type 'diff' (2024 form with per-head RMSNorm) has no llama.cpp equivalent.",
    "diff2_lambda": "diff2_lambda 'token' cannot be folded into a fixed output projection; use 'head'.",
    "rope_scaling": "rope_scaling must be None, or yarn with beta_fast 32, beta_slow 1 "
                    "and no attention_factor.",
}


# Stable caveat name -> one-line description: the file is written and runs, with a stated limitation.
CAVEATS: dict[str, str] = {
    "ssm_state_size": "ssm_state_size other than 128 or 256 runs on llama.cpp's CPU backend only (its CUDA, Vulkan "
                      "and SYCL Mamba2 scans exist for 128 and 256).",
    "ssm_head_dim": "ssm_head_dim other than 64 is outside the shape llama.cpp's GPU scans are exercised with "
                    "(Granite-4.0-H's); the CPU backend runs it exactly.",
    "hidden_multiple_256": "d_model or an FFN / expert hidden size that is not a multiple of 256 rules out the "
                           "K-quants (super-blocks of 256); f32, f16, bf16, q8_0 and q4_0 still fit (blocks of 32).",
}


@dataclass(frozen=True)
class ExportBlocker:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


def export_blockers(config: MambaMoEConfig) -> list[ExportBlocker]:
    """Every reason ``config`` cannot be exported to granitehybrid GGUF; empty if it can."""
    out: list[ExportBlocker] = []

    def block(rule: str, message: str) -> None:
        assert rule in RULES, rule
        out.append(ExportBlocker(rule, message))

    ffns = set(config.layer_ffns)
    has_moe, has_dense = "moe" in ffns, "dense" in ffns

    if "mamba" in config.layer_mixers:
        # llama.cpp's tensor loader asserts 2 * n_embd == d_inner.
        if config.ssm_expand != 2:
            block("ssm_expand", f"ssm_expand is {config.ssm_expand}; llama.cpp's Mamba2 supports only 2")
        # build_mamba2_layer asserts d_inner % (n_group * n_embd) == 0; with d_inner = 2 * n_embd
        # only 1 or 2 groups pass.
        if config.ssm_ngroups not in (1, 2):
            block("ssm_ngroups", f"ssm_ngroups is {config.ssm_ngroups}; llama.cpp's Mamba2 graph allows "
                  "only 1 or 2 (it asserts d_inner % (n_group * n_embd) == 0)")
        # granitehybrid's memory is always hybrid: a KV cache over the attention layers beside the recurrent
        # states. With no attention layer the KV cache has no buffer and llama.cpp aborts at load
        # (GGML_ASSERT(buffer) in ggml-backend.cpp, seen with llama-cpp-python 0.3.36). Its pure-SSM
        # architecture, mamba2, has no FFN, which ffn_uniform already rules out.
        if "attention" not in config.layer_mixers:
            block("attention_layer", "every layer is Mamba2; llama.cpp's granitehybrid needs at least one "
                  "attention layer (it aborts on an empty KV cache)")

    # granitehybrid puts an FFN on every layer, and whether it is MoE or dense is decided once for the
    # model (expert_count > 0), so layers cannot mix kinds or skip the FFN.
    if len(ffns) != 1 or "none" in ffns:
        block("ffn_uniform", f"layer_ffns uses {sorted(ffns)}; granitehybrid needs every layer to be "
              "'moe' or every layer to be 'dense'")

    # Both the dense FFN and the experts are built as down(silu(gate x) * up x).
    if (has_moe or has_dense) and config.ffn_activation != "swiglu":
        block("ffn_activation", f"ffn_activation is {config.ffn_activation!r}; granitehybrid only has swiglu")

    # llama.cpp routes by softmax over all experts, takes the top k and renormalises their weights:
    # that is our 'topk', and 'soft' with k = all experts. Switch drops tokens over capacity and scales
    # by the raw top-1 probability, which llama.cpp cannot express.
    if has_moe and config.moe_router == "switch":
        block("moe_router", "moe_router 'switch' (capacity dropping, raw top-1 probability scaling) has no "
              "llama.cpp equivalent; use 'soft' or 'topk'")


    if "attention" in config.layer_mixers:
        # 'diff' normalises each head with its own RMSNorm before o_proj; llama.cpp's attention has no
        # such step. 'diff2' with per-head lambda is a GQA layer with 2h heads and lambda folded into o_proj.
        if config.attn_type == "diff":
            block("attn_type", "attn_type 'diff' (2024 form with per-head RMSNorm) has no llama.cpp "
                  "equivalent; use 'diff2' or 'gqa'")
        if config.attn_type == "diff2" and config.diff2_lambda == "token":
            block("diff2_lambda", "diff2_lambda 'token' computes lambda per token, which cannot be folded "
                  "into a fixed output projection; use 'head'")
        # The config only accepts yarn. llama.cpp does not read the yarn betas for granitehybrid and
        # always uses its defaults 32 / 1 (as our model does when the keys are absent). An explicit
        # attention_factor replaces 0.1 ln(s) + 1 in our model, but llama.cpp multiplies its attn_factor
        # by 0.1 ln(s) + 1, so the same number would mean something else there.
        rs = config.rope_scaling or {}
        for key, expected in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            if float(rs.get(key, expected)) != expected:
                block("rope_scaling", f"rope_scaling.{key} is {rs[key]}; llama.cpp ignores it for "
                      f"granitehybrid and uses {expected:g}")
        if rs.get("attention_factor") is not None:
            block("rope_scaling", f"rope_scaling.attention_factor is {rs['attention_factor']}; llama.cpp "
                  "multiplies its attn_factor by 0.1 ln(factor) + 1 instead of replacing it; leave it unset")
    return out


def export_caveats(config: MambaMoEConfig) -> list[ExportBlocker]:
    """What an exportable ``config`` gives up in llama.cpp: the backends that will not run it.

    A phone runs llama.cpp on its CPU, where any d_state and head_dim are computed exactly (tested by
    logits against llama-cpp-python); GPU backends implement the Mamba2 scan for the shapes of published
    checkpoints only, and abort or fall back otherwise. So these are caveats, not blockers.
    """
    out: list[ExportBlocker] = []
    # K-quants (Q4_K etc.) pack rows in super-blocks of 256 values, so every matrix row length (the input
    # width of each linear layer) must be a multiple of 256 for them; the exporter checks each tensor
    # against the type asked for (``llama_quant.py``), so this only says which types are out of reach.
    ffns = set(config.layer_ffns)
    widths = {"d_model": config.d_model}
    if "dense" in ffns:
        widths["ffn_hidden_size"] = config.ffn_hidden_size
    if "moe" in ffns:
        widths["moe_expert_hidden_size"] = config.moe_expert_hidden_size
        if config.moe_shared_expert_hidden_size > 0:
            widths["moe_shared_expert_hidden_size"] = config.moe_shared_expert_hidden_size
    for name, value in widths.items():
        if value % 256:
            out.append(ExportBlocker("hidden_multiple_256", f"{name} is {value}, not a multiple of 256: no K-quant "
                                     "types (f32, f16, bf16, q8_0 and q4_0 fit)"))
    if "mamba" in config.layer_mixers:
        if config.ssm_state_size not in (128, 256):
            out.append(ExportBlocker("ssm_state_size", f"ssm_state_size is {config.ssm_state_size}: llama.cpp's "
                                     "CPU backend only (its GPU scans need 128 or 256)"))
        if config.ssm_head_dim != 64:
            out.append(ExportBlocker("ssm_head_dim", f"ssm_head_dim is {config.ssm_head_dim}: llama.cpp's CPU "
                                     "backend runs it; its GPU scans are exercised with 64 (Granite-4.0-H)"))
    return out


def check_exportable(config: MambaMoEConfig) -> None:
    """Raise ValueError listing every blocker if ``config`` cannot be exported to granitehybrid."""
    blockers = export_blockers(config)
    if blockers:
        raise ValueError("config cannot be exported to llama.cpp granitehybrid:\n"
                         + "\n".join(f"  - {b}" for b in blockers))
