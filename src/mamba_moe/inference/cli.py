"""``mamba-moe generate``, ``chat`` and ``serve``: argument parsing over ``load_engine`` and ``serve``.

    mamba-moe generate ckpt/ "Once upon a time" --max-tokens 64 --temperature 0.8 --seed 1
    mamba-moe chat ckpt/ --system "You are concise."
    mamba-moe chat ckpt/ --memory memory.db --user ada     # with the 4-tier memory (docs/memory.md)
    mamba-moe serve ckpt/ --port 8000

This module only turns arguments into calls: the engine is built by ``core.engine.load_engine`` and the
server run by ``serving.server.serve``, neither of which knows about argparse. Text from the command line
and from standard input goes through ``user_text`` (one policy: invalid UTF-8 is refused by position).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..cli_types import non_negative_float, positive_int
from ..user_text import InvalidTextError, check_text, decode_text
from .core.checkpoint import DTYPES
from .core.engine import Engine, load_engine
from .core.sampling import SamplingParams
from .gguf_runner import GGUFEngine, is_gguf_file

CHAT_HELP = "commands: /exit (or Ctrl-D) quits, /clear forgets the conversation, /system <text> sets the system prompt"
MEMORY_HELP = ("; with --memory also: /undo drops the last turn, /forget <words> deletes matching memories, "
               "/memories lists what is remembered")
PROMPT = ">>> "


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory: config.json, model.safetensors, tokenizer files "
                                           "(generate and chat also run a .gguf file, in llama.cpp)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default float32)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per prefill step")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: int8 weights for faster CPU decoding (experimental; float32 CPU models)")
    parser.add_argument("--decoder", choices=list(Engine.DECODERS), default="fast",
                        help="decode step: fast = fused step (default; equals the model's forward), model = the "
                             "model's forward (reference), fast-int8 = fused step with int8 weights (CPU), "
                             "cuda-graphs = fused step replayed as CUDA graphs (GPU)")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                       help=f"tokens to generate at most ({max_tokens})")
    group.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    stops = tuple(check_text(s, "--stop") for s in args.stop)
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=stops, seed=args.seed)


def engine_from_args(args: argparse.Namespace) -> Engine | GGUFEngine:
    """The engine the model flags describe (threads are a process setting, so they are set here).
    A ``.gguf`` MODEL runs in llama.cpp (``gguf_runner.py``), for ``generate`` and ``chat``."""
    if is_gguf_file(args.checkpoint):
        return GGUFEngine.from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load_engine(args.checkpoint, device=args.device, dtype=args.dtype, decoder=args.decoder,
                       quantize=args.quantize, prefill_chunk=args.prefill_chunk,
                       max_batch=getattr(args, "max_batch", None) or 16)  # CUDA-graph buckets up to it


# ---- generate ------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    # argv arrives decoded with surrogateescape (undecodable bytes become lone surrogates), stdin as bytes:
    # both are checked before the model is loaded, so a bad byte costs no load time and shows no traceback.
    if args.prompt is not None:
        prompt = check_text(args.prompt, "prompt (command-line argument)")
    elif hasattr(sys.stdin, "buffer"):
        prompt = decode_text(sys.stdin.buffer.read(), "prompt (standard input)")
    else:  # a text stream put in place of stdin (an embedding program, a test)
        prompt = check_text(sys.stdin.read(), "prompt (standard input)")
    system = check_text(args.system, "--system") if args.system else None
    params = sampling_params(args)
    engine = engine_from_args(args)
    if args.chat:
        messages = [{"role": "system", "content": system}] if system else []
        ids = engine.chat_prompt(messages + [{"role": "user", "content": prompt}])
    else:
        ids = engine.encode(prompt)
    if not args.no_echo and not args.chat:
        print(prompt, end="", flush=True)
    for event in engine.stream(ids, params):
        print(event.text, end="", flush=True)
    print()
    return 0


# ---- chat ----------------------------------------------------------------------------------------
class ChatSession:
    """The conversation of one terminal chat: a system prompt and alternating turns, trimmed to fit."""

    def __init__(self, engine: Any, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def clear(self) -> None:
        self.turns.clear()

    def set_system(self, system: str | None) -> None:
        self.system = system

    def prompt_ids(self) -> list[int]:
        """The templated conversation; the oldest turns are dropped while it does not fit the context."""
        while True:
            ids = self.engine.chat_prompt(self.messages())
            if len(ids) + self.params.max_tokens <= self.engine.max_context or len(self.turns) <= 1:
                return ids
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]

    def reply(self, user_text: str, write: Any) -> str:
        """Stream the assistant's answer through ``write``; the turn is kept only if it completes."""
        self.turns.append({"role": "user", "content": user_text})
        parts: list[str] = []
        try:
            for event in self.engine.stream(self.prompt_ids(), self.params):
                parts.append(event.text)
                write(event.text)
        except (KeyboardInterrupt, ValueError):
            self.turns.pop()
            raise
        text = "".join(parts)
        self.turns.append({"role": "assistant", "content": text})
        return text


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _tolerant_stdin() -> None:
    """Decode stdin with surrogateescape, so a line with undecodable bytes arrives (and is refused by
    ``check_text`` with its position) instead of raising inside ``input()``, which loses the line and, for a
    pipe, whatever else was in the same read."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


class MemoryChat:
    """The terminal chat with memory (``--memory``): a ``memory.session.MemorySession`` for one user, whose
    working memory keeps the model's state across turns (only each new turn is fed)."""

    def __init__(self, engine: Any, params: SamplingParams, system: str | None, db: str, user: str,
                 session: str | None) -> None:
        from ..memory.session import MemorySession
        from ..memory.store import MemoryStore

        self.store = MemoryStore(db)     # a foreign, newer or unreadable file fails here, by name
        try:
            self.session = MemorySession(engine, self.store, user, system=system, session=session)
        except BaseException:
            self.store.close()
            raise
        self.params = params

    @property
    def system(self) -> str | None:
        return self.session.system

    def set_system(self, system: str | None) -> None:
        self.session.set_system(system)

    def clear(self) -> None:
        self.session.clear()

    def reply(self, user_text: str, write: Any) -> str:
        return self.session.reply(user_text, self.params, write).text

    def command(self, command: str, rest: str) -> str | None:
        """The memory commands; None for a command that is not one of them."""
        if command == "/undo":
            if not self.session.working.turns:
                return "(nothing to undo)"
            self.session.rollback(1)
            return "(last turn dropped)"
        if command == "/forget":
            if not rest.strip():
                return "usage: /forget <words> (memories containing every word are deleted)"
            return f"({self.session.forget(query=rest.strip())} memories deleted)"
        if command == "/memories":
            self.session.barrier()
            records = self.store.list(self.session.user)
            return "\n".join(f"[{r.id}] {r.text}" for r in records) or "(nothing remembered)"
        return None

    def close(self) -> None:
        try:
            self.session.close()     # the queued writes are flushed before exit
        finally:
            self.store.close()


def memory_user(args: argparse.Namespace) -> str:
    """``--user``, else the login name: a terminal chat is one person's (see docs/inference.md)."""
    if args.user is not None:
        return check_text(args.user, "--user")
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError) as err:
        raise ValueError("--user: not given, and the login name cannot be found ($USER, $LOGNAME); "
                         "give --user NAME") from err


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    system = check_text(args.system, "--system") if args.system else None
    if args.memory is None and (args.user is not None or args.session is not None):
        raise ValueError("--user/--session: only with --memory DB")
    if args.memory is not None and is_gguf_file(args.checkpoint):   # the kept state is our engine's cache
        raise ValueError(f"--memory: needs a checkpoint directory, not the GGUF file {args.checkpoint}")
    user = memory_user(args) if args.memory is not None else None
    engine = engine_from_args(args)
    session: Any
    if args.memory is not None:
        session = MemoryChat(engine, sampling_params(args), system, args.memory, user, args.session)
    else:
        session = ChatSession(engine, sampling_params(args), system)
    try:
        return chat_loop(args, session)
    finally:
        if isinstance(session, MemoryChat):
            session.close()


def chat_loop(args: argparse.Namespace, session: Any) -> int:
    memory = isinstance(session, MemoryChat)
    help_text = CHAT_HELP + (MEMORY_HELP if memory else "")
    _tolerant_stdin()
    where = f" (memory: {args.memory}, user {session.session.user!r})" if memory else ""
    print(f"mamba-moe chat: {args.checkpoint}{where}\n{help_text}")
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        try:
            line = check_text(line, "input")
        except InvalidTextError as err:
            print(f"error: {err}; line skipped")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                return 0
            try:
                answer = session.command(command, rest) if memory else None
            except ValueError as err:   # e.g. /forget with no words to match: the chat goes on
                print(f"error: {err}")
                continue
            if answer is not None:
                print(answer)
            elif command == "/clear":
                session.clear()
                print("(conversation cleared)")
            elif command == "/system":
                session.set_system(rest.strip() or None)
                print("(system prompt set)" if session.system else "(system prompt removed)")
            else:
                print(f"unknown command {command!r}; {help_text}")
            continue
        try:
            session.reply(line, _out)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        except ValueError as err:
            print(f"error: {err}")
            continue
        print()


# ---- serve ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    if is_gguf_file(args.checkpoint):
        raise ValueError(f"{args.checkpoint}: serve runs checkpoints; for a GGUF file use llama.cpp's own server "
                         "(python -m llama_cpp.server --model FILE.gguf, or llama-server -m FILE.gguf)")
    from .serving.openai_api import Limits
    from .serving.server import serve

    limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                    request_timeout_s=args.request_timeout or None)
    store = None
    if args.memory is not None:   # opened first: a bad DB is a clear error before the model is loaded
        from ..memory.store import MemoryStore

        store = MemoryStore(args.memory)
    try:
        engine = engine_from_args(args)
        memory = None
        if store is not None:
            from .serving.memory import ServerMemory

            memory = ServerMemory(store, engine)
        name = args.model_name or Path(args.checkpoint).resolve().name
        return serve(engine, args.host, args.port, limits, model_name=name, max_batch=args.max_batch,
                     max_queue=args.max_queue, memory=memory)
    finally:
        if store is not None:
            store.close()   # a no-op after the server's own close at shutdown


def register(subparsers: Any) -> None:
    """Add ``generate``, ``chat`` and ``serve`` to the ``mamba-moe`` command."""
    gen = subparsers.add_parser("generate", help="complete a prompt from a checkpoint directory")
    add_model_args(gen)
    gen.add_argument("prompt", nargs="?", help="prompt text (default: read standard input)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--system", help="system prompt (with --chat)")
    gen.add_argument("--no-echo", action="store_true", help="print only the completion, not the prompt")
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = subparsers.add_parser("chat", help="interactive terminal chat with a checkpoint")
    add_model_args(chat)
    chat.add_argument("--system", help="system prompt")
    group = chat.add_argument_group("memory (docs/memory.md)")
    group.add_argument("--memory", metavar="DB", help="a memory DB (created if missing): the chat remembers the "
                       "user's facts across sessions and keeps its state across turns")
    group.add_argument("--user", help="whose memory (default: the login name)")
    group.add_argument("--session", help="the session's name: a name used before resumes its summary "
                       "(default: a new session)")
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    from .serving.openai_api import Limits

    default = Limits()
    srv = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server for a checkpoint")
    add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    srv.add_argument("--model-name", help="model id reported by /v1/models (default: the directory name)")
    srv.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together at most")
    srv.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting at most before 503")
    srv.add_argument("--memory", metavar="DB", help="a memory DB (created if missing): chat requests with a `user` "
                     "get that user's memory (docs/memory.md); without `user`, none")
    limits = srv.add_argument_group("limits (see docs/inference.md)")
    limits.add_argument("--max-body-bytes", type=positive_int, default=default.max_body_bytes,
                        help=f"largest request body; larger ones get 413 unread (default {default.max_body_bytes})")
    limits.add_argument("--max-messages", type=positive_int, default=default.max_messages,
                        help=f"most messages in a chat request (default {default.max_messages})")
    limits.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="longest prompt accepted (default: the model's context minus one)")
    limits.add_argument("--max-tokens-limit", type=positive_int, default=default.max_tokens_limit,
                        help=f"largest max_tokens a request may ask (default {default.max_tokens_limit})")
    limits.add_argument("--request-timeout", type=non_negative_float,
                        default=default.request_timeout_s,
                        help=f"seconds a request may take, queueing included; 0 = no limit "
                             f"(default {default.request_timeout_s:g})")
    srv.set_defaults(func=cmd_serve)
