"""The OpenAI HTTP API as plain functions: request bodies -> validated requests, events -> response JSON.

No web framework here, so the rules can be read (and tested) on their own. Every rejection is an
``APIError`` with the HTTP status and a message that names the offending field, shaped like OpenAI's
``{"error": {"message", "type", "param", "code"}}``. ``Limits`` holds what an operator bounds; the
server enforces its body size and time limits, ``parse_request`` the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ...user_text import InvalidTextError, check_text, decode_text
from ..core.prompt import PromptTooLongError
from ..core.request import Request, TokenLogprob
from ..core.sampling import MAX_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 4
MAX_N = 8                   # choices per request
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit; chat allows top_logprobs up to 20
# Accepted and ignored when they hold their default (clients send them routinely).
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "echo": False,
            "best_of": 1, "logit_bias": None, "tools": None, "tool_choice": None,
            "response_format": None, "suffix": None, "parallel_tool_calls": None}


class APIError(Exception):
    """A refused request: HTTP ``status``, OpenAI's error body, and any response ``headers`` it needs."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a server accepts; each field is a ``mamba-moe serve`` flag of the same name.

    ``max_body_bytes`` bounds what is read at all (2 MiB holds a 128k-token context of English text with
    room to spare); ``max_messages`` and ``max_prompt_tokens`` (None: the model's context minus one) bound
    what is tokenized; ``max_tokens_limit`` bounds a request's ``max_tokens``; ``request_timeout_s`` (None:
    none) bounds a request's wall time from arrival, queueing included.
    """

    max_body_bytes: int = 2 * 1024 * 1024
    max_messages: int = 256
    max_prompt_tokens: int | None = None
    max_tokens_limit: int = 1024
    request_timeout_s: float | None = 600.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_prompt_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is None and name == "max_prompt_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer (got {value!r})")
        timeout = self.request_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ValueError(f"request_timeout_s: must be a positive number of seconds or None (got {timeout!r})")

    def prompt_tokens(self, context: int) -> int:
        """The longest prompt accepted by a model of ``context`` tokens (one is left for the output)."""
        return min(self.max_prompt_tokens or context - 1, context - 1)


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1

    def choice_params(self) -> list[SamplingParams]:
        """Parameters of each of the ``n`` choices: a given seed becomes seed, seed + 1, ... (distinct but
        reproducible choices); without a seed each choice draws its own."""
        if self.params.seed is None:
            return [self.params] * self.n
        return [dataclasses.replace(self.params, seed=(self.params.seed + i) % 2**64) for i in range(self.n)]

    def requests(self, engine: Any) -> list[Request]:
        """One engine request per choice (the worker batches them like separate requests)."""
        try:
            return [engine.request(self.prompt_ids, params) for params in self.choice_params()]
        except ValueError as err:
            raise APIError(400, str(err)) from err


# ---- field readers -------------------------------------------------------------------------------------
def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"expected a number, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise _bad(name, f"must be between {low} and {high}, got {value}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise _bad(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise _bad(name, f"must be <= {high}, got {value}")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {type(value).__name__} {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "expected a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    try:  # matched against decoded text, which never holds a lone surrogate: such a stop could never match
        return tuple(check_text(s, f"stop[{i}]") for i, s in enumerate(stops))
    except InvalidTextError as err:
        raise APIError(400, str(err), "stop") from err


def _unsupported(body: dict) -> None:
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is None or value == neutral or (neutral in (None, False) and not value):
            continue  # absent, or the neutral value (false / empty count as "off")
        raise _bad(name, f"not supported by this server (only {neutral!r})")


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body: strict UTF-8 (the offset of a bad byte named), nesting bounded.

    A lone surrogate escaped in JSON (``"\\ud800"``) is valid JSON; the fields that are tokenized refuse it.
    Deep nesting (``[[[[...``) exhausts the parser's recursion limit: that is the client's error, not ours.
    """
    try:
        text = decode_text(raw, "request body")
    except InvalidTextError as err:
        raise APIError(400, str(err)) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(400, f"request body: not valid JSON ({err})") from err
    except RecursionError as err:
        raise APIError(400, "request body: JSON nested too deeply") from err


def check_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "request body: expected a JSON object")
    return body


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is None:
        raise _bad("model", "missing; this server serves " + repr(served))
    if not isinstance(model, str):
        raise _bad("model", f"expected a string, got {type(model).__name__}")
    if model != served:
        raise APIError(404, f"model: {model!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")


# ---- requests ------------------------------------------------------------------------------------------
def _prompt_ids_of_completion(body: dict, engine: Any, max_tokens: int) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "missing; give a string (or a list of token ids)")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]                     # a batch of one
    is_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)
    if isinstance(prompt, str) or is_ids:
        try:
            return engine.encode(prompt, max_tokens)
        except PromptTooLongError:
            raise
        except ValueError as err:
            raise _bad("prompt", str(err).removeprefix("prompt: ")) from err
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise _bad("prompt", "one prompt per request; send several requests (they are batched)")
    raise _bad("prompt", f"expected a string or a list of token ids, got {type(prompt).__name__}")


def _prompt_ids(body: dict, engine: Any, limits: Limits, chat: bool) -> list[int]:
    field = "messages" if chat else "prompt"
    max_prompt = limits.prompt_tokens(engine.max_context)
    try:
        if not chat:
            return _prompt_ids_of_completion(body, engine, max_prompt)
        if "messages" not in body or body["messages"] is None:
            raise _bad("messages", "missing; give a list of {role, content} messages")
        return engine.chat_prompt(body["messages"], max_prompt, limits.max_messages)
    except PromptTooLongError as err:
        raise _bad(field, str(err).removeprefix(f"{err.where}: ")) from err
    except ValueError as err:  # bad messages, text that is not UTF-8: the messages name the entry
        raise APIError(400, str(err), field) from err


def parse_request(body: Any, engine: Any, limits: Limits, served: str, chat: bool) -> ParsedRequest:
    """Validate an OpenAI ``/v1/chat/completions`` (chat=True) or ``/v1/completions`` body (parsed JSON).

    Cheap checks first (model, unsupported fields), then the prompt, which is the costly part: its length
    is bounded before it is tokenized (``core/prompt.py``). Call it off the event loop: it tokenizes.
    """
    body = check_body(body)
    check_model(body, served)
    _unsupported(body)
    prompt_ids = _prompt_ids(body, engine, limits, chat)
    if not prompt_ids:
        raise _bad("prompt" if not chat else "messages", "empty prompt")

    context = engine.max_context
    room = context - len(prompt_ids)
    token_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = min(limits.max_tokens_limit, room) if chat else min(16, room)
    max_tokens = _integer(body, token_field, default, 1, limits.max_tokens_limit)
    if max_tokens > room:
        raise _bad(token_field, f"the context holds {context} tokens; the prompt uses {len(prompt_ids)}, "
                   f"so at most {room} can be generated, but {max_tokens} were requested")
    logprobs = _logprobs(body, chat)
    n = _integer(body, "n", 1, 1, MAX_N)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "expected an object")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
            top_k=_integer(body, "top_k", 0, 0) or 0,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-3, 100.0),
            stop=_stop(body),
            seed=_integer(body, "seed", None, -(2**63), 2**64 - 1),
            ignore_eos=_boolean(body, "ignore_eos", False),
            logprobs=logprobs,
        )
    except ValueError as err:
        raise APIError(400, str(err)) from err
    return ParsedRequest(prompt_ids, params, _boolean(body, "stream", False),
                         _boolean(stream_options, "include_usage", False), n)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token to report, or None for no logprobs. Chat: ``logprobs`` (bool) +
    ``top_logprobs`` (0..20); completions: ``logprobs`` (0..5, the number of alternatives)."""
    if not chat:
        return _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if not _boolean(body, "logprobs", False):
        if top:
            raise _bad("top_logprobs", "needs logprobs: true")
        return None
    return top or 0


# ---- responses -----------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as text for logprobs (special tokens by name; a partial UTF-8 byte shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)


def chat_logprobs(items: list[TokenLogprob] | None, tokenizer: Any) -> dict[str, Any] | None:
    """OpenAI chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    if items is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(it.token_id, it.logprob), "top_logprobs": [entry(t, lp) for t, lp in it.top]}
                        for it in items]}


def completion_logprobs(items: list[TokenLogprob] | None, tokenizer: Any, offset: int = 0) -> dict[str, Any] | None:
    """Legacy completions ``logprobs``: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    if items is None:
        return None
    tokens = [token_text(tokenizer, it.token_id) for it in items]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [it.logprob for it in items],
            "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in it.top} for it in items],
            "text_offset": offsets}


def choice(chat: bool, index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response."""
    out: dict[str, Any] = {"index": index, "finish_reason": finish(reason), "logprobs": logprobs}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    return out


def response(chat: bool, rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(chat: bool, rid: str, model: str, text: str | None, reason: str | None, first: bool = False,
          usage_: dict[str, int] | None = None, index: int = 0,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One SSE chunk of choice ``index``; with ``usage_`` the final usage-only chunk (choices empty)."""
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}
    if usage_ is not None:
        return {**base, "choices": [], "usage": usage_}
    out: dict[str, Any] = {"index": index, "finish_reason": finish(reason), "logprobs": logprobs}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        out["delta"] = delta
    else:
        out["text"] = text or ""
    return {**base, "choices": [out]}
