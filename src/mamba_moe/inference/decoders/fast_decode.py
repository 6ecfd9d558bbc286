"""The fast decode step: the model's own ``decode`` over transformed weights (packed MoE, optional int8).

Why: a batch-1 decode step of ``mamba-moe-300m`` is bound by the weights it reads and, on a CPU, by the
number of operations it launches. The model's step (``MambaMoEForCausalLM.decode`` → ``HybridBlock.step``
→ ``Mamba2Mixer.step`` / ``MoEFeedForward.step``) already skips router statistics and writes the key mask
into a preallocated buffer. What is left is a matter of weights, so this module only transforms them:

- **packed MoE**: each MoE layer's routed experts and shared expert become two matrices
  (``model.ffn.PackedExperts``): one product over every expert's [gate | up] rows, one down projection over
  their concatenated hidden units. Top-k and Switch weights go through the same product (zero for the
  unchosen experts), so the step has no data-dependent shapes and no host sync (CUDA graphs capture it).
- ``int8=True`` (CPU): every ``nn.Linear`` of the backbone except the routers, the packed experts and the
  output head become int8-weight layers with dynamically quantized activations (fbgemm), so a 300M step
  reads ~0.3 GB instead of 1.2.

The transformed model is a structural copy that shares every tensor it does not transform with the
original (float: only the packed expert matrices are new, 151M parameters for mamba-moe-300m; int8: a
quarter of the quantized weights). It is built from the weights as they are: rebuild after changing them.
The model's own ``decode`` on the untransformed model is the reference (tests/inference/test_fast_decode.py,
float64: the same greedy tokens and logits within 1e-10).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor

from ...model.cache import HybridCache
from ...model.ffn import MoEFeedForward
from ...model.lm import MambaMoEForCausalLM
from .quantize import quantize_linears


def decode_model(model: MambaMoEForCausalLM, int8: bool = False, copy_modules: bool = True) -> MambaMoEForCausalLM:
    """An inference copy of ``model`` with packed MoE layers (and int8 linear layers if ``int8``).

    The copy shares all untransformed parameters and buffers with ``model``, which is not modified.
    ``copy_modules=False`` transforms ``model`` itself instead (``quantize_int8``: no float copy kept).
    """
    if int8 and (model.embed.weight.dtype != torch.float32 or model.embed.weight.device.type != "cpu"):
        raise ValueError("int8 decoding needs a float32 model on the CPU")
    clone = model
    if copy_modules:
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        clone = copy.deepcopy(model, memo=shared)   # new modules, the same tensors
    clone.eval()  # (its parameters are the original's: requires_grad is left as the caller set it)
    for module in clone.modules():
        if isinstance(module, MoEFeedForward):
            module.pack()
    if int8:
        if clone.lm_head is None:  # tied: the head as linear layers over the embedding, so it can be quantized
            clone.lm_head = clone.embed.linear_head()
        quantize_linears(clone)
    return clone


class FastDecoder:
    """The decode step ``(tokens (b, 1), cache) -> logits (b, V)`` of ``model`` on transformed weights.

    Use it through ``DecodeBatch(model, decoder=FastDecoder(model))`` or ``Engine(..., decoder="fast" |
    "fast-int8")``. Prefill still runs on the original model; ``self.model`` is the transformed copy
    (``decode_model``), whose ``step`` CUDA-graph decode captures.
    """

    def __init__(self, model: MambaMoEForCausalLM, int8: bool = False) -> None:
        self.int8 = int8
        self.model = decode_model(model, int8)
        self.config = model.config

    def __call__(self, tokens: Tensor, cache: HybridCache) -> Tensor:
        """Decode (b, 1) tokens on ``cache`` (updated in place, as the model's forward does): logits (b, V)."""
        return self.model.decode(tokens, cache)
