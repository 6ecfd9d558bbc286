"""An OpenAI-compatible endpoint (``openai:URL``) through the official ``openai`` client: our own
``mamba-moe serve``, vLLM, llama.cpp's server, or a hosted API.

Base prompts go to ``/v1/completions``, chats to ``/v1/chat/completions``; requests run on a few threads
so the server can batch them. The API gives no log-probabilities of a given text, so this backend only
generates (``ppl`` and lm-eval's scoring tasks need a local model). The key is read from the environment
variable named by ``api_key_env`` (default ``OPENAI_API_KEY``; a local server needs none).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import EvalError
from .base import Backend, BackendInfo, GenRequest, GenResult, truncate_at_stops

MAX_STOPS = 4   # the OpenAI API's limit; further stops are applied to the text afterwards


class OpenAIBackend(Backend):
    def __init__(self, url: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, timeout: float = 600.0) -> None:
        try:
            import openai
        except ImportError as err:
            raise EvalError("openai:URL needs the openai client: pip install openai") from err
        if not url.startswith(("http://", "https://")):
            raise EvalError(f"MODEL: openai:URL needs an http(s) URL such as openai:http://127.0.0.1:8000/v1, "
                            f"got {url!r}")
        self._openai = openai
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "unused",
                                    timeout=timeout, max_retries=2)
        try:
            listed = list(self.client.models.list())
        except openai.APIError as err:
            raise EvalError(f"{url}: cannot list models ({err})") from err
        if model is None:
            if not listed:
                raise EvalError(f"{url}: the server lists no models; name one with --openai-model")
            model = listed[0].id
        entry = next((m for m in listed if m.id == model), None)
        extra = (entry.model_extra or {}) if entry is not None else {}
        context = extra.get("max_model_len")
        self.max_context = int(context) if isinstance(context, int) else None
        self.model = model
        self.concurrency = concurrency
        self.info = BackendInfo("openai", f"{url} ({model})", {"url": url, "model": model,
                                                               "openai_client": openai.__version__})

    def _one(self, request: GenRequest) -> GenResult:
        extra = {"seed": request.seed} if request.seed is not None else {}
        stops = list(request.stop[:MAX_STOPS]) or None
        try:
            if request.messages is not None:
                response = self.client.chat.completions.create(
                    model=self.model, messages=request.message_dicts(), max_tokens=request.max_tokens,
                    temperature=request.temperature, stop=stops, **extra)
                choice = response.choices[0]
                text = choice.message.content or ""
            else:
                response = self.client.completions.create(
                    model=self.model, prompt=request.prompt, max_tokens=request.max_tokens,
                    temperature=request.temperature, stop=stops, **extra)
                choice = response.choices[0]
                text = choice.text or ""
        except self._openai.BadRequestError as err:   # e.g. a prompt longer than the server's context
            return GenResult("", "error", f"refused by the server: {err}")
        return GenResult(truncate_at_stops(text, request.stop), choice.finish_reason or "stop")

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        self.client.close()
