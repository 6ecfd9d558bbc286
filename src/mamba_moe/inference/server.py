"""``mamba-moe serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one checkpoint.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /health``. Requests are validated in ``openai_api`` (400 with a message naming
the field), then queued to the model's worker thread, which batches them continuously.
FastAPI and uvicorn are imported only here: ``pip install 'mamba-moe[serve]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from . import openai_api as api
from .engine import Engine
from .worker import BusyError, Job, Worker

try:  # optional dependencies: the rest of the package works without them
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:  # pragma: no cover
    uvicorn = FastAPI = None

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 1.0


def _require_web() -> None:
    if FastAPI is None or uvicorn is None:
        raise ImportError("mamba-moe serve needs FastAPI and uvicorn: pip install 'mamba-moe[serve]' "
                          "(or: pip install fastapi uvicorn)")


def create_app(engine: Engine, model_name: str, limits: api.Limits, max_batch: int = 8, max_queue: int = 64) -> Any:
    """The ASGI app; its worker thread starts and stops with the app's lifespan."""
    _require_web()
    worker = Worker(engine.model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=engine.prefill_chunk,
                    decoder=engine.decoder)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="mamba-moe", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(api.APIError)
    async def api_error(request: Any, err: api.APIError) -> Any:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Any, err: Any) -> Any:
        return JSONResponse(api.APIError(400, f"invalid request: {err.errors()}").body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "running": len(worker.batch), "queued": worker.inbox.qsize()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mamba-moe", "max_model_len": limits.context}]}

    async def body_of(request: Any) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise api.APIError(400, f"request body: not valid JSON ({err})") from err

    def logprobs_json(chat: bool, items: Any, offset: int = 0) -> Any:
        if chat:
            return api.chat_logprobs(items, engine.tokenizer)
        return api.completion_logprobs(items, engine.tokenizer, offset)

    async def complete(request: Any, chat: bool) -> Any:
        parsed = api.parse_request(await body_of(request), engine, limits, model_name, chat)
        loop = asyncio.get_running_loop()
        try:  # one job per choice (n > 1): the worker batches them like separate requests
            jobs = [Job(engine.request(parsed.prompt_ids, params), loop) for params in parsed.choice_params()]
        except ValueError as err:
            raise api.APIError(400, str(err)) from err
        submitted: list[Job] = []
        try:
            for job in jobs:
                worker.submit(job)
                submitted.append(job)
        except BusyError as err:
            for job in submitted:
                job.cancelled.set()
            raise api.APIError(503, str(err), kind="server_error", code="busy") from err
        rid = api.new_id(chat)
        n_prompt = len(parsed.prompt_ids)
        if parsed.stream:
            return StreamingResponse(sse(jobs, rid, chat, n_prompt, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices, n_out = [], 0
        for index, job in enumerate(jobs):
            parts, reason, items = [], None, ([] if parsed.params.logprobs is not None else None)
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        if await request.is_disconnected():
                            for other in jobs:
                                other.cancelled.set()
                            return JSONResponse({}, status_code=499)
                        continue
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        raise api.APIError(500, f"generation failed: {item}", kind="server_error")
                    parts.append(item.text)
                    n_out += len(item.token_ids)
                    if items is not None and item.logprobs:
                        items.extend(item.logprobs)
                    reason = item.finish_reason or reason
            finally:
                if reason is None:
                    for other in jobs[index:]:
                        other.cancelled.set()
            choices.append(api.choice(chat, index, "".join(parts), reason, logprobs_json(chat, items)))
        return api.response(chat, rid, model_name, choices, n_prompt, n_out)

    async def sse(jobs: list[Job], rid: str, chat: bool, n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:  # one job's events into the merged stream
            while True:
                item = await job.events.get()
                await merged.put((index, item))
                if item is None:
                    return

        pumps = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        n_out, running, done, offsets = 0, len(jobs), set(), [0] * len(jobs)
        try:
            if chat:
                for i in range(len(jobs)):
                    yield data(api.chunk(chat, rid, model_name, "", None, first=True, index=i))
            while running:
                i, item = await merged.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    yield data(api.APIError(500, f"generation failed: {item}", kind="server_error").body())
                    break
                n_out += len(item.token_ids)
                logprobs = logprobs_json(chat, item.logprobs, offsets[i]) if item.logprobs else None
                if item.text or item.finish_reason or logprobs:
                    yield data(api.chunk(chat, rid, model_name, item.text or None, item.finish_reason, index=i,
                                         logprobs=logprobs))
                offsets[i] += len(item.text)
                if item.finish_reason is not None:
                    done.add(i)
            if include_usage:
                yield data(api.chunk(chat, rid, model_name, None, None, usage_=api.usage(n_prompt, n_out)))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): free the slots
            for task in pumps:
                task.cancel()
            for i, job in enumerate(jobs):
                if i not in done:
                    job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    return app


def serve(args: argparse.Namespace) -> int:
    """Run the server in the foreground until interrupted (the ``serve`` subcommand)."""
    _require_web()
    from .cli import load_engine

    for name in ("max_batch", "max_queue", "max_tokens_limit", "max_prompt_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be a positive integer (got {value})")
    engine = load_engine(args)
    context = engine.max_context
    limits = api.Limits(max_prompt_tokens=min(args.max_prompt_tokens or context - 1, context - 1),
                        max_tokens_limit=args.max_tokens_limit, context=context)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, name, limits, max_batch=args.max_batch, max_queue=args.max_queue)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    print(f"mamba-moe serve: model {name!r} on http://{args.host}:{port}/v1 "
          f"(max batch {args.max_batch}, max prompt {limits.max_prompt_tokens} tokens, "
          f"max_tokens <= {limits.max_tokens_limit})", flush=True)
    logging.basicConfig(level=logging.INFO)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
