"""Our weights as llama.cpp ``granitehybrid`` tensors: names, layouts and the few exact rewrites.

Every transform reads the model's own modules and helpers (``TokenEmbedding.full_table``,
``fold_diff2_output_projection``); nothing here re-implements the forward pass. Arrays are returned in
PyTorch's (out, in) order; GGUF stores the reversed shape, which is ggml's (ne0 = in, ne1 = out).

| ours                                    | GGUF (layer N)                         | transform                         |
|-----------------------------------------|----------------------------------------|-----------------------------------|
| embed.weight (+ embed.proj.weight)      | token_embd.weight                      | factors multiplied out            |
| lm_head.weight (untied only)            | output.weight                          | none; tied heads write nothing    |
| backbone.final_norm.weight              | output_norm.weight                     |                                   |
| layers.N.mixer_norm.weight              | blk.N.attn_norm.weight                 |                                   |
| mixer.in_proj.weight                    | blk.N.ssm_in.weight                    |                                   |
| mixer.conv1d.weight / .bias             | blk.N.ssm_conv1d.weight / .bias        | (C, 1, K) squeezed to (C, K)      |
| mixer.dt_bias                           | blk.N.ssm_dt.bias                      |                                   |
| mixer.A_log                             | blk.N.ssm_a                            | -exp(A_log), (H, 1)               |
| mixer.D                                 | blk.N.ssm_d                            | (H, 1)                            |
| mixer.norm.weight                       | blk.N.ssm_norm.weight                  | (G, d_inner / G)                  |
| mixer.out_proj.weight                   | blk.N.ssm_out.weight                   |                                   |
| mixer.q_proj / k_proj.weight            | blk.N.attn_q / attn_k.weight           | rows permuted to adjacent pairs   |
| mixer.v_proj.weight                     | blk.N.attn_v.weight                    |                                   |
| mixer.o_proj.weight (+ diff_lambda)     | blk.N.attn_output.weight               | diff2: -sigmoid(lambda) folded in |
| layers.N.ffn_norm.weight                | blk.N.ffn_norm.weight                  |                                   |
| ffn.router.weight                       | blk.N.ffn_gate_inp.weight              |                                   |
| ffn.experts.{gate,up,down}_proj         | blk.N.ffn_{gate,up,down}_exps.weight   | already stacked (E, out, in)      |
| ffn.shared_expert.{gate,up,down}_proj   | blk.N.ffn_{gate,up,down}_shexp.weight  |                                   |
| ffn.{gate,up,down}_proj (dense)         | blk.N.ffn_{gate,up,down}.weight        |                                   |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..ops.diff_attention import fold_diff2_output_projection
from .errors import ExportError


@dataclass
class GGUFTensor:
    name: str
    data: np.ndarray          # float32, PyTorch (out, in) order
    source: str               # the parameter(s) it was made from, for error messages

    @property
    def is_matrix(self) -> bool:
        """Stored at the file's precision (f16, a quant type); False = always f32, as llama.cpp keeps them.

        The rule of llama.cpp's converter and quantizer: 1-D tensors, anything not named ``*.weight``
        (``ssm_a``, ``ssm_d``, biases), norms, the MoE router and the Mamba conv stay f32.
        """
        return (self.data.ndim >= 2 and self.name.endswith(".weight") and not self.name.endswith("_norm.weight")
                and "ffn_gate_inp" not in self.name and "ssm_conv1d" not in self.name)


def permute_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """q/k projection rows from the half-split RoPE layout (pairs i, i + d/2; ours and HF's) to llama.cpp's
    NORM layout (pairs 2i, 2i + 1): within each head, row i goes to 2i and row i + d/2 to 2i + 1.

    The same permutation of q and k leaves every q.k product unchanged, and pair i keeps frequency i.
    This is ``LlamaModel.permute`` of llama.cpp's converter.
    """
    out_features, in_features = weight.shape
    if out_features % (2 * n_heads):
        raise ExportError(f"RoPE permutation: {out_features} rows do not split into {n_heads} heads of even width")
    d = out_features // n_heads
    return weight.reshape(n_heads, 2, d // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def gguf_tensors(model) -> list[GGUFTensor]:
    """All tensors of ``model`` (a ``MambaMoEForCausalLM``) under their granitehybrid names."""
    out: list[GGUFTensor] = []

    def add(name: str, t: Tensor, source: str) -> None:
        if not torch.isfinite(t).all():
            raise ExportError(f"{source}: contains NaN or Inf values; {name} would be unusable")
        out.append(GGUFTensor(name, _np(t), source))

    with torch.no_grad():
        table = model.embed.full_table()
        add("token_embd.weight", table, "embed.weight" + (" x embed.proj.weight" if model.embed.proj is not None
                                                          else ""))
        add("output_norm.weight", model.backbone.final_norm.weight, "backbone.final_norm.weight")
        if model.lm_head is not None:
            add("output.weight", model.lm_head.weight, "lm_head.weight")

        for i, layer in enumerate(model.backbone.layers):
            p, b = f"backbone.layers.{i}", f"blk.{i}"
            add(f"{b}.attn_norm.weight", layer.mixer_norm.weight, f"{p}.mixer_norm.weight")
            m = layer.mixer
            if layer.mixer_kind == "mamba":
                add(f"{b}.ssm_in.weight", m.in_proj.weight, f"{p}.mixer.in_proj.weight")
                add(f"{b}.ssm_conv1d.weight", m.conv1d.weight[:, 0, :], f"{p}.mixer.conv1d.weight")
                bias = m.conv1d.bias if m.conv1d.bias is not None else torch.zeros(m.conv_dim)
                add(f"{b}.ssm_conv1d.bias", bias, f"{p}.mixer.conv1d.bias")
                add(f"{b}.ssm_dt.bias", m.dt_bias, f"{p}.mixer.dt_bias")
                add(f"{b}.ssm_a", (-torch.exp(m.A_log.float()))[:, None], f"{p}.mixer.A_log")
                add(f"{b}.ssm_d", m.D[:, None], f"{p}.mixer.D")
                add(f"{b}.ssm_norm.weight", m.norm.weight.reshape(m.ngroups, m.d_inner // m.ngroups),
                    f"{p}.mixer.norm.weight")
                add(f"{b}.ssm_out.weight", m.out_proj.weight, f"{p}.mixer.out_proj.weight")
            else:
                if m.kind == "gqa":
                    q_heads, o_proj = m.num_heads, m.o_proj.weight
                elif m.kind == "diff2" and m.diff2_lambda == "head":
                    # o_i = o_2i - sigma(lambda_i) o_2i+1 is linear in the 2h head outputs: a GQA layer with 2h
                    # heads whose output projection carries -sigma(lambda_i) on head 2i+1's columns.
                    q_heads = 2 * m.num_heads
                    lam = torch.sigmoid(m.diff_lambda.float())
                    o_proj = fold_diff2_output_projection(m.o_proj.weight.float(), lam, m.head_dim)
                else:
                    form = m.kind if m.kind != "diff2" else "diff2 with diff2_lambda='token'"
                    raise ExportError(f"{p}.mixer: attention form {form} has no llama.cpp equivalent")
                add(f"{b}.attn_q.weight", permute_rope_rows(m.q_proj.weight, q_heads), f"{p}.mixer.q_proj.weight")
                add(f"{b}.attn_k.weight", permute_rope_rows(m.k_proj.weight, m.num_kv_heads),
                    f"{p}.mixer.k_proj.weight")
                add(f"{b}.attn_v.weight", m.v_proj.weight, f"{p}.mixer.v_proj.weight")
                add(f"{b}.attn_output.weight", o_proj, f"{p}.mixer.o_proj.weight")

            if layer.ffn_kind == "none":
                raise ExportError(f"{p}: has no FFN; granitehybrid gives every layer one (rule ffn_uniform)")
            add(f"{b}.ffn_norm.weight", layer.ffn_norm.weight, f"{p}.ffn_norm.weight")
            f = layer.ffn
            if layer.ffn_kind == "moe":
                if f.experts.activation != "swiglu":
                    raise ExportError(f"{p}.ffn.experts: activation {f.experts.activation!r}; llama.cpp builds "
                                      "swiglu experts only (rule ffn_activation)")
                add(f"{b}.ffn_gate_inp.weight", f.router.weight, f"{p}.ffn.router.weight")
                for ours, theirs in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    add(f"{b}.ffn_{theirs}_exps.weight", getattr(f.experts, ours), f"{p}.ffn.experts.{ours}")
                if f.shared_expert is not None:
                    for ours, theirs in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                        add(f"{b}.ffn_{theirs}_shexp.weight", getattr(f.shared_expert, ours).weight,
                            f"{p}.ffn.shared_expert.{ours}.weight")
            else:
                if f.activation != "swiglu":
                    raise ExportError(f"{p}.ffn: activation {f.activation!r}; llama.cpp builds swiglu FFNs only "
                                      "(rule ffn_activation)")
                for ours, theirs in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    add(f"{b}.ffn_{theirs}.weight", getattr(f, ours).weight, f"{p}.ffn.{ours}.weight")
    return out
