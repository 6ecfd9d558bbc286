"""Evaluation: one offline harness that scores our checkpoints and peer models on the same tasks.

    mamba-moe eval MODEL --tasks gsm8k,humaneval,ppl,passkey,mqar --limit 50 --output runs/eval
    mamba-moe eval MODEL --tasks mt-bench-local --set mt-bench-local.judge=JUDGE_MODEL --limit 10

``backends/`` turns MODEL (our checkpoint directory, an HF causal-LM directory, a GGUF file, or
``openai:URL``) into one small interface (generate, and score where the backend can); ``tasks/`` holds
one module per task with its prompts and scorer; ``runner.py`` caches every sample as it finishes (so an
interrupted run resumes) and ``report.py`` writes the report with 95% intervals. ``lm_eval_adapter.py``
registers our checkpoints with lm-evaluation-harness as ``--model mamba-moe``.
"""

from .errors import EvalError

__all__ = ["EvalError"]
