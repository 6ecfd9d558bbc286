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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
    from ..inference.checkpoint import end_token_ids

    eos = getattr(getattr(teacher.model, "config", None), "eos_token_id", None)
    ids = set(end_token_ids(teacher.tokenizer))
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids


def _stepper(teacher: Teacher) -> Callable[[Tensor], Tensor]:
    """A function: new ids (1, n) -> next-token logits (1, V), carrying the model's decode state."""
    model = teacher.model
    if teacher.kind == "mamba-moe":
        cache = model.new_cache(1, device=teacher.device)
        return lambda ids: model(ids, cache=cache).logits[:, -1].float()
    state: dict[str, Any] = {"past": None}

    def step(ids: Tensor) -> Tensor:
        out = model(input_ids=ids, past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[:, -1].float()

    return step


@torch.no_grad()
def generate_response(teacher: Teacher, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
                      generator: torch.Generator) -> tuple[str, bool]:
    """The teacher's answer to ``messages`` (greedy at temperature 0, else sampled), special tokens removed,
    and whether it ended with a stop token (False: cut off at ``max_new_tokens``)."""
    tok = teacher.tokenizer
    if not getattr(tok, "chat_template", None):
        raise DistillationError(f"teacher {teacher.source}: its tokenizer has no chat template; sequence-level "
                                "distillation needs the teacher's own chat format")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=teacher.device)
    stop = _stop_ids(teacher)
    step = _stepper(teacher)
    logits = step(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        else:
            token = int(logits.argmax(-1))
        if token in stop:
            return tok.decode(new, skip_special_tokens=True).strip(), True
        new.append(token)
        logits = step(torch.tensor([[token]], device=teacher.device))
    return tok.decode(new, skip_special_tokens=True).strip(), False


def write_jsonl_atomic(records: Sequence[dict[str, Any]], out_path: str | os.PathLike) -> Path:
    """Write one JSON object per line to ``out_path`` via a temporary file and a rename."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp-{out_path.name}-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def generate_chat_dataset(teacher: Teacher, prompts: Sequence[Prompt], out_path: str | os.PathLike,
                          max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                          system: str | None = None, keep_truncated: bool = False) -> Path:
    """Teacher answers to ``prompts`` written to ``out_path`` as JSONL chats (``{"messages": [...]}``).

    A prompt is a user message (str) or a chat (list of role/content dicts) ending before the answer.
    Sampling (``temperature > 0``) is seeded by ``seed``, so the same call writes the same file. Answers cut
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
    generator = torch.Generator().manual_seed(seed)
    records, cut = [], 0
    for i, prompt in enumerate(prompts):
        messages = _messages(prompt, system, f"prompts[{i}]")
        answer, finished = generate_response(teacher, messages, max_new_tokens, temperature, generator)
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
