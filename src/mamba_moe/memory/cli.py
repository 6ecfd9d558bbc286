"""``mamba-moe memory add|search|list|forget|import|history --db DB --user NAME``: look at and mend a memory DB.

Exit codes: 0 done; 1 nothing matched (``forget`` removed nothing, ``history`` of an unknown slot);
2 bad input or an unusable DB (the message names the field, file and line). ``--json`` prints one JSON
object per line instead of the table, for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..cli_types import positive_int
from ..user_text import InvalidTextError, decode_text
from .errors import MemoryInputError
from .records import KINDS
from .store import MAX_DOCUMENT_BYTES, MODES, MemoryStore, check_document, check_memory

DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
FACT_FIELDS = ("text", "slot", "value", "kind", "session", "agent", "valid_from", "source")


def _open(args: argparse.Namespace, *, create: bool = False) -> MemoryStore:
    return MemoryStore(args.db, create=create)


def _emit(args: argparse.Namespace, obj: Any, line: str) -> None:
    print(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, ensure_ascii=False)
          if args.json else line)


def _when(record) -> str:
    return f"{record.valid_from[:19]}Z -> {record.valid_to[:19] + 'Z' if record.valid_to else 'now'}"


def _record_line(record) -> str:
    slot = f" [{record.slot}={record.value}]" if record.slot else ""
    scope = "".join(f" {k}={v}" for k, v in (("session", record.session), ("agent", record.agent)) if v)
    state = "" if record.is_current else " (past)"
    return f"#{record.id}{slot}{scope}{state}: {record.text}"


def cmd_add(args: argparse.Namespace) -> int:
    with _open(args, create=True) as store:
        record = store.add(args.user, args.text, slot=args.slot, value=args.value, kind=args.kind,
                           session=args.session, agent=args.agent, valid_from=args.valid_from, source=args.source)
        _emit(args, record, f"added {_record_line(record)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if args.documents:
            hits = store.search_documents(args.user, args.query, k=args.k, mode=args.mode)
            for hit in hits:
                _emit(args, hit, f"{hit.rank}. {hit.score:.4f} {hit.name} chunk {hit.chunk_index} "
                                 f"[{hit.start}:{hit.end}]: {' '.join(hit.text.split())[:200]}")
        else:
            hits = store.search(args.user, args.query, k=args.k, mode=args.mode, session=args.session,
                                agent=args.agent, include_superseded=args.all_versions)
            for hit in hits:
                _emit(args, hit, f"{hit.rank}. {hit.score:.4f} {_record_line(hit.record)}")
    if not hits and not args.json:
        print("no match")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as store:
        records = store.list(args.user, session=args.session, agent=args.agent,
                             include_superseded=args.all_versions, limit=args.limit)
        for record in records:
            _emit(args, record, _record_line(record))
        if args.documents:
            for doc_id, name, n_chunks in store.list_documents(args.user):
                _emit(args, {"doc_id": doc_id, "name": name, "n_chunks": n_chunks},
                      f"document #{doc_id}: {name} ({n_chunks} chunks)")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with _open(args) as store:
        records = store.history(args.user, args.slot, agent=args.agent)
    for record in records:
        _emit(args, record, f"{_when(record)}  {_record_line(record)}")
    if not records:
        print(f"no history for slot {args.slot!r} of user {args.user!r}", file=sys.stderr)
        return 1
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if args.document is not None:
            removed = store.forget_document(args.user, args.document)
            what = f"document #{args.document} ({removed} chunks)"
        else:
            if args.session_only and args.session is None:
                raise MemoryInputError("--session-only: give the session with --session")
            removed = store.forget(args.user, ids=args.id, query=args.query, everything=args.all,
                                   session=args.session)
            what = f"{removed} memories" + (" and all documents and summaries" if args.all else "")
    if not removed:
        print(f"nothing to forget for user {args.user!r}", file=sys.stderr)
        return 1
    _emit(args, {"removed": removed}, f"forgot {what}")
    return 0


def _read_text(path: Path, limit: int) -> str:
    size = path.stat().st_size
    if size > limit:
        raise MemoryInputError(f"{path}: {size:,} bytes, over the limit of {limit:,}; nothing imported")
    try:
        return decode_text(path.read_bytes(), str(path))
    except InvalidTextError as err:
        raise MemoryInputError(str(err)) from None


def _read_facts(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file of facts, checked before anything is stored (a bad line names file:line)."""
    facts = []
    for number, line in enumerate(_read_text(path, 64 * MAX_DOCUMENT_BYTES).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            fact = json.loads(line)
        except json.JSONDecodeError as err:
            raise MemoryInputError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(fact, dict):
            raise MemoryInputError(f"{where}: expected an object with a 'text' field, got {type(fact).__name__}")
        unknown = sorted(set(fact) - set(FACT_FIELDS))
        if unknown:
            raise MemoryInputError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(FACT_FIELDS)}")
        if "text" not in fact:
            raise MemoryInputError(f"{where}: missing 'text'")
        facts.append({**fact, "_where": where})
    return facts


def cmd_import(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.files]
    for path in paths:
        if not path.is_file():
            raise MemoryInputError(f"{path}: no such file")
        if path.suffix.lower() not in (*DOCUMENT_SUFFIXES, ".jsonl"):
            raise MemoryInputError(f"{path}: expected a text/markdown document ({', '.join(DOCUMENT_SUFFIXES)}) "
                                   "or a .jsonl of facts")
    # read and check every file first: a bad file stops the import before anything is stored
    loaded = [(path, _read_facts(path) if path.suffix.lower() == ".jsonl" else _read_text(path, MAX_DOCUMENT_BYTES))
              for path in paths]
    for path, content in loaded:   # the store's own checks too, so a bad value cannot stop it half-way
        if isinstance(content, str):
            check_document(args.user, path.name, content, source=str(path))
            continue
        for fact in content:
            try:
                check_memory(args.user, **{k: v for k, v in fact.items() if k != "_where"})
            except MemoryInputError as err:
                raise MemoryInputError(f"{fact['_where']}: {err}") from None
    with _open(args, create=True) as store:
        for path, content in loaded:
            if isinstance(content, str):
                doc_id = store.add_document(args.user, path.name, content, source=str(path))
                _emit(args, {"doc_id": doc_id, "name": path.name}, f"imported document #{doc_id}: {path.name}")
                continue
            for fact in content:
                where = fact.pop("_where")
                try:
                    record = store.add(args.user, **fact)
                except MemoryInputError as err:
                    raise MemoryInputError(f"{where}: {err}") from None
                _emit(args, record, f"imported {_record_line(record)}")
    return 0


def register(subparsers: Any) -> None:
    memory = subparsers.add_parser("memory", help="look at and mend a long-term memory DB (docs/memory.md)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = memory.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--db", required=True, help="the memory DB file")
        p.add_argument("--user", required=True, help="whose memory (every action sees only this user's data)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        return p

    add = action("add", "store a fact, note or event (with --slot: supersedes the slot's current value)")
    add.add_argument("text")
    add.add_argument("--slot", help="what the fact is about, e.g. home.city; a new value supersedes the old")
    add.add_argument("--value", help="the slot's value, e.g. Berlin")
    add.add_argument("--kind", choices=KINDS, default="fact")
    add.add_argument("--session")
    add.add_argument("--agent")
    add.add_argument("--valid-from", help="when it became true (ISO-8601; default now)")
    add.add_argument("--source", help="where it came from")
    add.set_defaults(func=cmd_add)

    search = action("search", "the user's memories (or --documents) most relevant to a query")
    search.add_argument("query")
    search.add_argument("-k", "--k", type=positive_int, default=5)
    search.add_argument("--mode", choices=MODES, default="fused")
    search.add_argument("--documents", action="store_true", help="search the user's documents instead")
    search.add_argument("--session")
    search.add_argument("--agent")
    search.add_argument("--all-versions", action="store_true", help="include superseded and retracted records")
    search.set_defaults(func=cmd_search)

    listing = action("list", "the user's memories, oldest first")
    listing.add_argument("--session")
    listing.add_argument("--agent")
    listing.add_argument("--all-versions", action="store_true", help="include superseded and retracted records")
    listing.add_argument("--limit", type=positive_int)
    listing.add_argument("--documents", action="store_true", help="also list the user's documents")
    listing.set_defaults(func=cmd_list)

    history = action("history", "every value a slot had, oldest first (\"what did I say before?\")")
    history.add_argument("slot")
    history.add_argument("--agent")
    history.set_defaults(func=cmd_history)

    forget = action("forget", "remove memories for good (text, index entries, vectors, summaries)")
    what = forget.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", type=int, nargs="+", help="these memory ids")
    what.add_argument("--query", help="the memories containing every word of this text (all versions)")
    what.add_argument("--all", action="store_true", help="everything of the user: memories, summaries, documents")
    what.add_argument("--document", type=int, metavar="DOC_ID", help="one document")
    what.add_argument("--session-only", action="store_true", help="everything of --session")
    forget.add_argument("--session", help="only within this session")
    forget.set_defaults(func=cmd_forget)

    imp = action("import", "add text/markdown files as documents, or a .jsonl of facts ({\"text\": ...} a line)")
    imp.add_argument("files", nargs="+")
    imp.set_defaults(func=cmd_import)
