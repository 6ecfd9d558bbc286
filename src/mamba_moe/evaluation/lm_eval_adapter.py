"""lm-evaluation-harness adapter: our checkpoints as ``--model mamba-moe``.

Importing this module registers the model with lm-eval's registry. lm-eval's own ``lm_eval`` command
does not load plugins, so run it through ours (same arguments)::

    mamba-moe lm-eval run --model mamba-moe --model_args pretrained=ckpt/,dtype=float32 \\
        --tasks my_task --include_path tasks/

or from Python: ``import mamba_moe.evaluation.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model=
"mamba-moe", ...)``. Scoring is the harness's own (``backends/scoring.py``), so lm-eval's
log-likelihoods are exactly those of ``mamba-moe eval``'s ``ppl`` task: same tokenization (special-token
strings as text), the end-of-text token as the prefix of an empty context, and the same rolling windows
as lm-eval's ``get_rolling_token_windows(..., context_len=1)``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .backends.checkpoint import CheckpointBackend

DEFAULT_MAX_GEN_TOKS = 256
log = logging.getLogger(__name__)


@register_model("mamba-moe")
class MambaMoELM(LM):
    """``pretrained``: checkpoint directory; ``device``, ``dtype`` (float32, bfloat16, float64, ...),
    ``max_batch`` (sequences decoded together in ``generate_until``)."""

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32", max_batch: int = 16,
                 batch_size: Any = None, max_length: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes its default device (cuda:0) to every model; its HF model falls back the same way
            log.warning("device %s asked for but CUDA is not available: using cpu", device)
            device = "cpu"
        if kwargs:
            raise ValueError(f"--model_args: unknown argument(s) for mamba-moe: {', '.join(sorted(kwargs))} "
                             "(known: pretrained, device, dtype, max_batch, max_length)")
        self.backend = CheckpointBackend(pretrained, device=device, dtype=dtype, max_batch=int(max_batch))
        if max_length is not None:
            self.backend.max_context = min(int(max_length), self.backend.max_context)
        self._device = device

    # ---- scoring ---------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        results = self.backend.loglikelihood([tuple(r.args) for r in requests])
        out = [(r.logprob, r.is_greedy) for r in results]
        for request, value in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, value)
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        out = [-r.nll for r in self.backend.rolling_loglikelihood([r.args[0] for r in requests])]
        for request, value in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return out

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        from ..inference import SamplingParams

        engine = self.backend.engine
        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            if not sample:
                temperature = 0.0
            ids = engine.encode(context) if context else [self.backend.prefix_id]
            keep = max(1, self.backend.max_context - max_gen)
            ids = ids[-keep:]   # like lm-eval's HF model: the context is cut on the left to leave room
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max(1, min(max_gen, self.backend.max_context - len(ids))),
                                         temperature=temperature, stop=tuple(s for s in until if s),
                                         seed=kwargs.pop("seed", None)))
        completions = engine.generate(prompts, params) if prompts else []
        out = [c.text for c in completions]
        for request, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    # ---- chat ------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.backend.path.resolve()).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.backend.engine.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.backend.engine.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)


def run_cli(argv: list[str]) -> int:
    """lm-eval's command line (``lm_eval.__main__``) with this module's registration in place."""
    import sys

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]   # HarnessCLI.parse_args reads sys.argv (and rewrites it for legacy calls)
    try:
        args = parser.parse_args()
    finally:
        sys.argv = saved
    parser.execute(args)
    return 0
