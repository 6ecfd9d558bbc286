"""Sequence-level distillation: the teacher answers prompts, and its answers become a chat dataset.

This works across tokenizers (a 151k-token Qwen teacher, a 49k-token SmolLM2, our 32k student): the
teacher reads each prompt through its OWN chat template and tokenizer, and what is stored is text, as
JSONL records ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- the chat-source format that
:class:`mamba_moe.data.sft.SFTDataset` reads (``SourceConfig(kind="jsonl", messages_field="messages")``),
so the SFT stages re-tokenize it with the student's tokenizer and train on the assistant turns. A
template's built-in default system prompt (SmolLM2 adds one) is not copied into the records; pass
``system`` to state one explicitly.

An answer that reaches ``max_new_tokens`` before the teacher's end token is cut off mid-thought. Stored as
a complete turn it would teach the student to end its answers there (the chat template closes every
assistant turn), so such answers are dropped by default, with a warning that counts them;
``keep_truncated=True`` keeps them, marked ``"truncated": true`` on the record.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from .distill import DistillationError, Teacher

Prompt = str | Sequence[dict[str, str]]


def _messages(prompt: Prompt, system: str | None, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DistillationError(f"{where}: message {i} needs string 'role' and 'content', got {m!r}")
    if not messages or messages[-1]["role"] == "assistant":
        raise DistillationError(f"{where}: a prompt must be a string or a non-empty chat that does not end "
                                "with an assistant turn")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _stop_ids(teacher: Teacher) -> set[int]:
    from ..inference.core.checkpoint import end_token_ids

    eos = getattr(getattr(teacher.model, "config", None), "eos_token_id", None)
    ids = set(end_token_ids(teacher.tokenizer))
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids


def prompt_ids(teacher: Teacher, messages: list[dict[str, str]]) -> list[int]:
    """The teacher's own chat template applied to ``messages``, ending in its assistant prompt, as ids."""
    tok = teacher.tokenizer
    if not getattr(tok, "chat_template", None):
        raise DistillationError(f"teacher {teacher.source}: its tokenizer has no chat template; sequence-level "
                                "distillation needs the teacher's own chat format")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


# An answer: the new token ids without the end token, and whether the teacher ended it (False: cut off).
Answer = tuple[list[int], bool]


def _engine_answers(teacher: Teacher, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    seed: int) -> list[Answer]:
    """Our own teacher: the inference engine decodes every prompt in one continuously batched run."""
    from ..inference import Engine, SamplingParams
    from .engine_runs import complete

    engine = Engine(teacher.model, teacher.tokenizer, max_batch=16)
    stop = tuple(sorted(_stop_ids(teacher)))
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed + i, stop_token_ids=stop)
              for i in range(len(prompts))]
    try:
        done = complete(engine, prompts, params)
    except ValueError as err:  # a prompt longer than the teacher's context
        raise DistillationError(f"teacher {teacher.source}: {err}") from err
    return [(c.token_ids[:-1], True) if c.finish_reason == "stop" else (c.token_ids, False) for c in done]


def _transformers_answers(teacher: Teacher, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                          seed: int) -> list[Answer]:
    """A transformers (or GGUF) teacher: its own ``generate``, one prompt at a time (no padding to get right).

    Every sampling option is set explicitly: transformers fills unset ones from the model's generation
    config and its own defaults (top-k 50), which would silently change the distribution asked for."""
    from transformers import GenerationConfig

    stop = sorted(_stop_ids(teacher))
    sample = temperature > 0
    # (the truncation filters only exist when sampling; transformers warns about them on a greedy config)
    filters = {"temperature": temperature, "top_k": 0, "top_p": 1.0, "typical_p": 1.0} if sample else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_length=0, eos_token_id=stop,
                              pad_token_id=stop[0] if stop else None, **filters)
    device = teacher.device
    answers = []
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids], device=device)
        # generate() samples from the global RNG: seed a forked copy so the caller's stream is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            out = teacher.model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        new = out[0, len(ids):].tolist()
        finished = bool(new) and new[-1] in stop
        answers.append((new[:-1], True) if finished else (new, False))
    return answers


@torch.no_grad()
def generate_responses(teacher: Teacher, chats: list[list[dict[str, str]]], max_new_tokens: int,
                       temperature: float, seed: int) -> list[tuple[str, bool]]:
    """The teacher's answer to each chat (greedy at temperature 0, else sampled with seed ``seed + i`` for
    chat ``i``), special tokens removed, and whether it ended with a stop token (False: cut off at
    ``max_new_tokens``). Decoding is the inference engine's (our teachers) or transformers' (the others)."""
    ids = [prompt_ids(teacher, messages) for messages in chats]
    run = _engine_answers if teacher.kind == "mamba-moe" else _transformers_answers
    answers = run(teacher, ids, max_new_tokens, temperature, seed)
    return [(teacher.tokenizer.decode(new, skip_special_tokens=True).strip(), finished) for new, finished in answers]


def write_jsonl_atomic(records: Sequence[dict[str, Any]], out_path: str | os.PathLike) -> Path:
    """Write one JSON object per line to ``out_path`` atomically and durably (``atomic_write``)."""
    out_path = Path(out_path)
    atomic_write(out_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return out_path


def generate_chat_dataset(teacher: Teacher, prompts: Sequence[Prompt], out_path: str | os.PathLike,
                          max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                          system: str | None = None, keep_truncated: bool = False) -> Path:
    """Teacher answers to ``prompts`` written to ``out_path`` as JSONL chats (``{"messages": [...]}``).

    A prompt is a user message (str) or a chat (list of role/content dicts) ending before the answer.
    Sampling (``temperature > 0``) is seeded by ``seed`` (``seed + i`` for prompt ``i``, so an answer does
    not depend on the other prompts), and the same call writes the same file. Answers cut
    off at ``max_new_tokens`` are dropped (a warning counts them) unless ``keep_truncated``, which keeps
    them marked ``"truncated": true``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DistillationError(f"max_new_tokens: must be a positive integer (got {max_new_tokens!r})")
    if temperature < 0:
        raise DistillationError(f"temperature: must be >= 0 (got {temperature!r})")
    if isinstance(prompts, str) or not prompts:
        raise DistillationError("prompts: expected a non-empty list of prompts")
    teacher.model.eval()
    chats = [_messages(prompt, system, f"prompts[{i}]") for i, prompt in enumerate(prompts)]
    records, cut = [], 0
    for messages, (answer, finished) in zip(chats, generate_responses(teacher, chats, max_new_tokens, temperature,
                                                                      seed), strict=True):
        record: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": answer}]}
        if not finished:
            cut += 1
            if not keep_truncated:
                continue
            record["truncated"] = True
        records.append(record)
    if cut and not keep_truncated:
        if not records:
            raise DistillationError(f"every one of the {cut} answers reached max_new_tokens={max_new_tokens} before "
                                    "the teacher's end token; raise max_new_tokens (or keep_truncated=True)")
        warnings.warn(f"{cut} of {len(prompts)} teacher answers reached max_new_tokens={max_new_tokens} and were "
                      "dropped (keep_truncated=True keeps them, marked)", stacklevel=2)
    return write_jsonl_atomic(records, out_path)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a file: ``.jsonl`` records with ``prompt`` (str) or ``messages`` (chat), else one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DistillationError(f"{path}: cannot read prompts ({err})") from err
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DistillationError(f"{path}:{n}: not JSON ({err})") from err
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                prompts.append(record["messages"])
            else:
                raise DistillationError(f"{path}:{n}: expected an object with 'prompt' (string) or 'messages'")
        else:
            prompts.append(line.strip())
    if not prompts:
        raise DistillationError(f"{path}: no prompts in the file")
    return prompts
