"""``mamba-moe serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /health``. A request passes three stages, each bounded by ``openai_api.Limits``:

1. **The body** is read here as a stream and refused with 413 as soon as it is known to be too large: by
   its Content-Length before a byte is read, else by counting (chunked bodies). Nothing unbounded is
   buffered, parsed or tokenized.
2. **Decoding, validation and tokenization** (``openai_api.parse_request``) run on a small thread pool,
   never on the event loop, and tokenization releases the GIL, so ``/health`` and other clients are
   answered while a large prompt is encoded.
3. **Generation** runs on the model's worker thread (``worker.py``), which batches requests continuously.
   A client that disconnects is noticed at once (a task waits for the ASGI disconnect message) and its
   rows leave the batch at the next step; ``request_timeout_s`` bounds the whole request.

With ``memory`` (``serve --memory DB``), a chat request's ``user`` gets that user's memory: retrieval into
the prompt at stage 2, writes after the reply (``memory.py``).

FastAPI and uvicorn are imported only here: ``pip install 'mamba-moe[serve]'``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from ..core.engine import Engine
from . import openai_api as api
from .memory import MemoryTurn, ServerMemory
from .worker import BusyError, Job, Worker

try:  # optional dependencies: the rest of the package works without them
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError:  # pragma: no cover
    uvicorn = FastAPI = None

log = logging.getLogger(__name__)
PROMPT_THREADS = 2   # requests decoded and tokenized at once; more would only compete for the 2 cores with decode
CLIENT_GONE = 499    # nginx's "client closed request": the status of a response nobody will read
DRAIN_BYTES = 64 << 20   # after a 413, read and discard at most this much of the refused body ...
DRAIN_SECONDS = 2.0      # ... for at most this long, then close


def _require_web() -> None:
    if FastAPI is None or uvicorn is None:
        raise ImportError("mamba-moe serve needs FastAPI and uvicorn: pip install 'mamba-moe[serve]' "
                          "(or: pip install fastapi uvicorn)")


def _timed_out(limits: api.Limits) -> api.APIError:
    # x-should-retry: the openai client would otherwise retry a 5xx twice, tripling the load that caused it.
    return api.APIError(504, f"request timed out after {limits.request_timeout_s:g} s (this server's request "
                        "timeout)", kind="server_error", code="timeout", headers={"x-should-retry": "false"})


def create_app(engine: Engine, model_name: str, limits: api.Limits | None = None, max_batch: int = 8,
               max_queue: int = 64, memory: ServerMemory | None = None) -> Any:
    """The ASGI app; its worker thread and prompt threads start and stop with the app's lifespan (and the
    ``memory``'s writer is flushed and its store closed when it ends)."""
    _require_web()
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer (got {value!r})")
    limits = limits or api.Limits()
    worker = Worker(engine.model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=engine.prefill_chunk,
                    decoder=engine.decoder)
    prompt_pool = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="mamba-moe-prompts")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()
        prompt_pool.shutdown(wait=False, cancel_futures=True)
        if memory is not None:
            memory.close()

    app = FastAPI(title="mamba-moe", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(api.APIError)
    async def api_error(request: Any, err: api.APIError) -> Any:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Any, err: Any) -> Any:
        return JSONResponse(api.APIError(400, f"invalid request: {err.errors()}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, err: Any) -> Any:  # unknown paths and methods, in the same shape
        return JSONResponse(api.APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Any, err: Exception) -> Any:
        # Starlette logs the traceback after this handler; the client gets the OpenAI shape, not plain text.
        body = api.APIError(500, f"internal error ({type(err).__name__}); see the server log", kind="server_error")
        return JSONResponse(body.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out = {"status": "ok", "model": model_name, "running": len(worker.batch), "queued": worker.inbox.qsize()}
        if memory is not None:
            out["memory"] = memory.health()
        return out

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mamba-moe", "max_model_len": engine.max_context}]}

    def too_large(size: int | None) -> api.APIError:
        got = f"{size} bytes" if size is not None else "more bytes"
        # The rest of the body is never read, so the connection cannot carry another request: close it.
        return api.APIError(413, f"request body: {got} than the {limits.max_body_bytes} bytes this server accepts "
                            "(max_body_bytes)", code="request_too_large", headers={"Connection": "close"})

    async def read_body(request: Any) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            await discard_body(request, 0)
            raise too_large(int(declared))
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    await discard_body(request, size)
                    raise too_large(None)
                chunks.append(chunk)
        except ClientDisconnect as err:
            raise api.APIError(CLIENT_GONE, "client disconnected") from err
        return b"".join(chunks)

    async def discard_body(request: Any, seen: int) -> None:
        """Read and drop what is left of a refused body, within a byte and a time budget, before answering.

        Closing a socket with unread bytes makes the kernel send a reset, which can destroy the 413 before a
        client still sending its body reads it (seen on a loaded 2-core machine: the openai client got
        "Connection reset by peer"). nginx's "lingering close" solves the same problem. Nothing is kept, and
        the loop stays free between chunks, so other requests are served meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        try:
            while seen < DRAIN_BYTES:
                message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except (TimeoutError, ClientDisconnect):
            return  # the budget is spent or the client left: answer and close now

    def prepare(raw: bytes, chat: bool) -> tuple[api.ParsedRequest, list[Any], MemoryTurn]:
        """On a prompt thread: bytes -> JSON -> (the user's memory) -> validated request -> one engine
        request per choice."""
        body = api.decode_body(raw)
        # Validated before memory sees it: a request answered with a 4xx changes nothing (a "forget ..." in
        # a request with a bad parameter must not delete).
        parsed = api.parse_request(body, engine, limits, model_name, chat)
        turn = MemoryTurn(None)
        if memory is not None and chat:
            turn = memory.prepare(body, limits.max_messages)
        if turn.status == "on" and turn.messages is not body["messages"]:
            try:
                with_memory = api.parse_request({**body, "messages": turn.messages}, engine, limits, model_name,
                                                chat)
                return with_memory, with_memory.requests(engine), turn
            except api.APIError as err:
                if err.param not in ("messages", "max_tokens", "max_completion_tokens"):
                    raise
                turn.facts = turn.documents = 0   # the block made the prompt too long: answer without it
        return parsed, parsed.requests(engine), turn

    def logprobs_json(chat: bool, items: Any, offset: int = 0) -> Any:
        if chat:
            return api.chat_logprobs(items, engine.tokenizer)
        return api.completion_logprobs(items, engine.tokenizer, offset)

    async def complete(request: Any, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if limits.request_timeout_s is None else loop.time() + limits.request_timeout_s

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        try:
            raw = await asyncio.wait_for(read_body(request), left())
        except TimeoutError as err:
            raise api.APIError(408, f"request body: not received within {limits.request_timeout_s:g} s",
                               headers={"Connection": "close"}) from err
        try:
            parsed, requests, turn = await asyncio.wait_for(loop.run_in_executor(prompt_pool, prepare, raw, chat),
                                                            left())
        except TimeoutError as err:
            raise _timed_out(limits) from err
        jobs = [Job(r, loop) for r in requests]
        try:
            for job in jobs:
                worker.submit(job)
        except BusyError as err:
            for job in jobs:
                job.cancelled.set()
            raise api.APIError(503, str(err), kind="server_error", code="busy") from err
        rid = api.new_id(chat)
        headers = turn.header() if memory is not None and chat else {}

        def replied() -> None:   # the reply is complete: the memory writes may run now, off its path
            if memory is not None:
                memory.after_reply(turn)

        if parsed.stream:
            return StreamingResponse(sse(jobs, rid, chat, len(parsed.prompt_ids), parsed.include_usage, left,
                                         replied),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        out = await collect(request, jobs, parsed, chat, rid, left)
        if isinstance(out, Response):
            return out
        replied()
        return JSONResponse(out, headers=headers)

    async def cancel_on_disconnect(request: Any, jobs: list[Job], gone: asyncio.Event) -> None:
        # Once the body is read, the next ASGI message is the disconnect: waiting for it notices a client
        # that left within the event loop's next turn (polling, as before, only after 1 s without a token,
        # never fired while tokens flowed, so an abandoned request ran to max_tokens).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        for job in jobs:
            job.cancelled.set()

    async def collect(request: Any, jobs: list[Job], parsed: api.ParsedRequest, chat: bool, rid: str,
                      left: Any) -> Any:
        gone = asyncio.Event()
        watcher = asyncio.create_task(cancel_on_disconnect(request, jobs, gone))
        choices, n_out = [], 0
        try:
            for index, job in enumerate(jobs):
                parts, reason, items = [], None, ([] if parsed.params.logprobs is not None else None)
                while (item := await asyncio.wait_for(job.events.get(), left())) is not None:
                    if isinstance(item, Exception):
                        raise api.APIError(500, f"generation failed: {item}", kind="server_error")
                    parts.append(item.text)
                    n_out += len(item.token_ids)
                    if items is not None and item.logprobs:
                        items.extend(item.logprobs)
                    reason = item.finish_reason or reason
                choices.append(api.choice(chat, index, "".join(parts), reason, logprobs_json(chat, items)))
        except TimeoutError as err:
            raise _timed_out(limits) from err
        finally:
            watcher.cancel()
            for job in jobs:  # a no-op for finished jobs; frees the slots of the others
                job.cancelled.set()
        if gone.is_set():
            return Response(status_code=CLIENT_GONE)
        return api.response(chat, rid, model_name, choices, len(parsed.prompt_ids), n_out)

    async def sse(jobs: list[Job], rid: str, chat: bool, n_prompt: int, include_usage: bool,
                  left: Any, replied: Any) -> AsyncIterator[str]:
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
                try:
                    i, item = await asyncio.wait_for(merged.get(), left())
                except TimeoutError:
                    yield data(_timed_out(limits).body())
                    break
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
            if len(done) == len(jobs):
                # before [DONE]: a client that has read the whole stream then finds the writes queued, and one
                # that disconnects right after [DONE] (the generator closed at that yield) loses none of them
                replied()
            if include_usage:
                yield data(api.chunk(chat, rid, model_name, None, None, usage_=api.usage(n_prompt, n_out)))
            yield "data: [DONE]\n\n"
        finally:  # the client went away, time ran out, or we finished: free the slots
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


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, limits: api.Limits | None = None, *,
          model_name: str = "mamba-moe", max_batch: int = 8, max_queue: int = 64,
          memory: ServerMemory | None = None) -> int:
    """Serve ``engine`` in the foreground until interrupted; ``port`` 0 picks a free port (printed)."""
    _require_web()
    limits = limits or api.Limits()
    app = create_app(engine, model_name, limits, max_batch=max_batch, max_queue=max_queue, memory=memory)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    timeout = "none" if limits.request_timeout_s is None else f"{limits.request_timeout_s:g} s"
    print(f"mamba-moe serve: model {model_name!r} on http://{host}:{bound}/v1 "
          f"(max batch {max_batch}, max prompt {limits.prompt_tokens(engine.max_context)} tokens, "
          f"max_tokens <= {limits.max_tokens_limit}, body <= {limits.max_body_bytes} bytes, "
          f"<= {limits.max_messages} messages, timeout {timeout}"
          f"{', memory ' + str(memory.store.path) if memory is not None else ''})", flush=True)
    logging.basicConfig(level=logging.INFO)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
