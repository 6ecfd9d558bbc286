"""Corpus sources: turn files, JSONL/Parquet records, HF datasets or the stdlib into documents.

A document is either plain text or a chat (a list of ``{"role", "content"}`` messages). Bad input never
stops a run half-way and never vanishes silently: an unreadable file, invalid UTF-8, an empty document,
a missing or mistyped field is counted in a :class:`SkipLog` under a reason, with example locations, and
reading goes on. Problems of the configuration itself (a path that matches nothing, a missing optional
package) are raised before any work starts.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import io
import json
import os
import sysconfig
import tokenize
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..user_text import InvalidTextError, check_text, decode_text
from .config import DataError, SourceConfig

# Skip reasons (a skipped document is not in the shards) and notes (kept, but worth knowing).
UNREADABLE = "unreadable"
NON_UTF8 = "non-utf8"
EMPTY = "empty"
MISSING_FIELD = "missing-field"
BAD_JSON = "bad-json"
BAD_RECORD = "bad-record"
BAD_MESSAGES = "bad-messages"
DUPLICATE = "duplicate"
INVALID_TEXT = "invalid-text"          # a lone surrogate (e.g. a JSON "\ud800" escape): no tokenizer takes it
REPLACED_UTF8 = "utf8-replaced"
DECLARED_ENCODING = "pep263-decoded"
SYMLINK_LOOP = "symlink-loop"          # a note: a directory link back into its own ancestors, not followed

_TEST_DIRS = {"test", "tests", "idle_test"}
_MAX_EXAMPLES = 5


@dataclass(slots=True)
class Document:
    """One document: ``text`` or ``messages`` (exactly one is set), and where it came from."""

    text: str | None
    messages: list[dict[str, str]] | None
    where: str

    def key(self) -> str:
        """The content as one string: what dedup and the train/val split hash."""
        if self.text is not None:
            return self.text
        return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)

    def chars(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(m["content"]) for m in self.messages or ())


class SkipLog:
    """Counts of skipped documents (and of kept-but-altered ones) per source and reason, with examples."""

    def __init__(self) -> None:
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.notes: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], list[str]] = defaultdict(list)

    def skip(self, source: str, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        self.skipped[(source, reason)] += count
        self._example(source, reason, where, detail)

    def note(self, source: str, what: str, where: str, detail: str = "") -> None:
        self.notes[(source, what)] += 1
        self._example(source, what, where, detail)

    def _example(self, source: str, reason: str, where: str, detail: str) -> None:
        examples = self.examples[(source, reason)]
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{where}: {detail}" if detail else where)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the manifest."""
        def table(counter: Counter[tuple[str, str]]) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for (source, reason), n in sorted(counter.items()):
                out.setdefault(source, {})[reason] = {"count": n, "examples": self.examples[(source, reason)]}
            return out
        return {"total": self.total, "skipped": table(self.skipped), "notes": table(self.notes)}

    def lines(self) -> list[str]:
        """Human-readable report, one line per (source, reason)."""
        out = []
        for label, counter in (("skipped", self.skipped), ("note", self.notes)):
            for (source, reason), n in sorted(counter.items()):
                example = self.examples[(source, reason)][0] if self.examples[(source, reason)] else ""
                out.append(f"{label}: {source}: {n} x {reason} (e.g. {example})")
        return out


# ---- embedded corpus ------------------------------------------------------------------------------

def stdlib_files(include_tests: bool = False, site_packages: bool = False) -> list[Path]:
    """The ``*.py`` files of the running interpreter's standard library, sorted by path.

    Test folders (``test``, ``tests``, ``idle_test``) are left out unless ``include_tests``; installed
    packages (``site-packages``) only with ``site_packages``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"} | (set() if include_tests else _TEST_DIRS)
    files = _walk_py(root, skip)
    if site_packages:
        files += _walk_py(Path(sysconfig.get_paths()["purelib"]), {"__pycache__"})
    return files


def _walk_py(root: Path, skip: set[str]) -> list[Path]:
    """``*.py`` under ``root``, sorted, not descending into folders named in ``skip``."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        found += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(found)


# ---- resolving inputs -----------------------------------------------------------------------------

def resolve_paths(source: SourceConfig, where: str = "source", log: SkipLog | None = None) -> list[Path]:
    """The files of a files/jsonl/parquet/stdlib source, sorted and de-duplicated.

    Raises :class:`DataError` naming every entry of ``paths`` that matches nothing, before any reading.
    Directory links that loop back (see :func:`glob_files`) are noted in ``log`` as ``symlink-loop``.
    """
    if source.kind == "stdlib":
        return stdlib_files(source.include_tests, source.site_packages)
    found: list[Path] = []
    missing = []

    def on_loop(link: Path, target: Path) -> None:
        if log is not None:
            log.note(source.name, SYMLINK_LOOP, str(link), f"links back to {target}; not followed")

    for entry in source.paths:
        entry = str(Path(entry).expanduser())
        if globlib.has_magic(entry):
            matches = [p for p in sorted(glob_files(entry, on_loop)) if not p.is_dir()]
        else:
            path = Path(entry)
            if path.is_dir():
                matches = sorted(p for p in path.glob(source.glob) if not p.is_dir())
            elif path.exists() or path.is_symlink():
                matches = [path]
            else:
                matches = []
        if not matches:
            missing.append(entry)
        found += matches
    if missing:
        raise DataError(f"{where}.paths: no file matches {', '.join(map(repr, missing))} "
                        f"(source {source.name!r})")
    seen: set[Path] = set()
    unique = []
    for path in found:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return unique


def glob_files(pattern: str, on_loop: Callable[[Path, Path], None] | None = None) -> Iterator[Path]:
    """What ``glob.glob(pattern, recursive=True)`` yields, except that ``**`` never re-enters a directory.

    ``glob.glob`` follows directory symlinks under ``**``, so a link to an ancestor (``data/loop -> ..``)
    makes it recurse until paths exceed the OS limit: practically never finishing, since every level
    multiplies. Here ``**`` still follows links (a linked dataset folder is read, as before), but a
    directory whose identity (device, inode) is already on the current path is a loop: it is skipped and
    reported to ``on_loop(link, target)``. Everything else is glob's: ``*``, ``?`` and ``[...]`` within one
    component, names starting with a dot matched only by patterns that start with one, ``**`` matching
    zero or more directories (and, last, every file below).
    """
    parts = Path(pattern).parts
    literal = 0
    while literal < len(parts) and not globlib.has_magic(parts[literal]):
        literal += 1
    base = Path(*parts[:literal]) if literal else Path()
    rest = parts[literal:]
    if not rest:  # no wildcard at all: the path itself, as glob.glob would (exists or is a link)
        if os.path.lexists(base):
            yield base
        return
    try:
        start = os.stat(base)
    except OSError:
        return
    yield from _glob_select(base, rest, ((start.st_dev, start.st_ino),), on_loop)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _list(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:  # unreadable folders are passed over, as glob does
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as glob does
    except OSError:
        return False


def _glob_select(folder: Path, parts: tuple[str, ...], ancestors: tuple[tuple[int, int], ...],
                 on_loop: Callable[[Path, Path], None] | None) -> Iterator[Path]:
    head, rest = parts[0], parts[1:]
    if head == "**":
        if not rest:  # a final ** matches zero directories too: the folder itself, as glob yields it
            yield folder
        yield from _glob_recursive(folder, rest, ancestors, on_loop)
        return
    if not globlib.has_magic(head):
        child = folder / head
        if not rest:
            if os.path.lexists(child):
                yield child
        elif child.is_dir():
            ident = _identity(child)
            if ident is not None:
                yield from _glob_select(child, rest, ancestors + (ident,), on_loop)
        return
    entries = _list(folder)
    if not head.startswith("."):
        entries = [e for e in entries if not e.name.startswith(".")]
    for entry in entries:
        if not fnmatch.fnmatchcase(entry.name, head):
            continue
        child = folder / entry.name
        if not rest:
            yield child
        elif _is_dir(entry):
            ident = _identity(child)
            if ident is not None:  # a fixed-depth pattern ends even through a loop: glob's result, unchanged
                yield from _glob_select(child, rest, ancestors + (ident,), on_loop)


def _glob_recursive(folder: Path, rest: tuple[str, ...], ancestors: tuple[tuple[int, int], ...],
                    on_loop: Callable[[Path, Path], None] | None) -> Iterator[Path]:
    """``**`` at ``folder``: ``rest`` applied to ``folder`` and to every directory below it, loops cut."""
    if rest:
        yield from _glob_select(folder, rest, ancestors, on_loop)
    for entry in _list(folder):
        if entry.name.startswith("."):
            continue
        child = folder / entry.name
        if not _is_dir(entry):
            if not rest:  # a final ** matches every file too
                yield child
            continue
        ident = _identity(child)
        if ident is None:
            continue
        if ident in ancestors:
            if on_loop is not None:
                on_loop(child, Path(os.path.realpath(child)))
            continue
        if not rest:
            yield child
        yield from _glob_recursive(child, rest, ancestors + (ident,), on_loop)


def check_source(source: SourceConfig, where: str = "source") -> None:
    """Fail early on problems that would otherwise surface mid-run (missing files or packages)."""
    if source.kind in ("files", "jsonl", "parquet", "stdlib"):
        resolve_paths(source, where)
    if source.kind == "parquet":
        _require("pyarrow", f"{where}: parquet sources need the 'pyarrow' package (pip install pyarrow)")
    if source.kind == "hf":
        _require("datasets", f"{where}: 'hf' sources need the 'datasets' package (pip install datasets)")


def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DataError(message)


# ---- reading --------------------------------------------------------------------------------------

def decode_bytes(raw: bytes, path: Path | None, errors: str, where: str = "") -> tuple[str | None, str | None]:
    """Text of ``raw`` and a note: UTF-8, else (``.py``) the PEP 263 declared encoding, else per ``errors``.

    Strict UTF-8 is :func:`mamba_moe.user_text.decode_text`, the project's one policy for user text.
    Returns ``(None, NON_UTF8)`` when the document must be skipped.
    """
    try:
        return decode_text(raw, where), None
    except InvalidTextError:
        pass
    if path is not None and path.suffix == ".py":
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
            if encoding.replace("_", "-").lower() not in ("utf-8", "utf-8-sig"):
                return raw.decode(encoding), DECLARED_ENCODING
        except (SyntaxError, LookupError, UnicodeDecodeError):
            pass
    if errors == "replace":
        return raw.decode("utf-8", errors="replace"), REPLACED_UTF8
    return None, NON_UTF8


def _bad_utf8(raw: bytes) -> tuple[int, str]:
    """Where ``raw`` stops being UTF-8: its line (from 1) and ``byte B (0xNN) is not UTF-8``."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return raw.count(b"\n", 0, exc.start) + 1, f"byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8"
    return 1, ""


def text_problem(doc: Document) -> str | None:
    """Why no tokenizer can take ``doc``'s text (a lone surrogate, via :func:`check_text`), or None."""
    try:
        if doc.text is not None:
            check_text(doc.text, "text")
        for i, message in enumerate(doc.messages or ()):
            check_text(message["role"], f"messages[{i}].role")
            check_text(message["content"], f"messages[{i}].content")
    except InvalidTextError as err:
        return str(err)
    return None


def iter_documents(source: SourceConfig, log: SkipLog, min_chars: int = 1) -> Iterator[Document]:
    """Documents of ``source`` in a deterministic order; problems go to ``log``, never raise mid-way.

    At most ``source.max_docs`` documents are yielded.
    """
    if source.kind in ("files", "stdlib"):
        docs = _file_documents(source, log)
    elif source.kind == "jsonl":
        docs = _jsonl_documents(source, log)
    elif source.kind == "parquet":
        docs = _parquet_documents(source, log)
    elif source.kind == "hf":
        docs = _hf_documents(source, log)
    else:  # validated earlier; kept for safety
        raise DataError(f"source {source.name!r}: unknown kind {source.kind!r}")
    count = 0
    for doc in docs:
        # One check for every kind: JSON's "\ud800" escape (jsonl, parquet, hf) is valid JSON but not text,
        # and would abort the tokenizer mid-run; here it is one counted skip naming file:line.
        problem = text_problem(doc)
        if problem is not None:
            log.skip(source.name, INVALID_TEXT, doc.where, problem)
            continue
        if doc.chars() < min_chars or (doc.text is not None and not doc.text.strip()):
            log.skip(source.name, EMPTY, doc.where)
            continue
        yield doc
        count += 1
        if source.max_docs is not None and count >= source.max_docs:
            return


def _file_documents(source: SourceConfig, log: SkipLog) -> Iterator[Document]:
    for path in resolve_paths(source, log=log):
        try:
            raw = path.read_bytes()
        except OSError as err:
            log.skip(source.name, UNREADABLE, str(path), err.strerror or type(err).__name__)
            continue
        text, note = decode_bytes(raw, path, source.encoding_errors, str(path))
        if text is None:
            line, problem = _bad_utf8(raw)
            log.skip(source.name, NON_UTF8, f"{path}:{line}", problem)
            continue
        if note:
            log.note(source.name, note, str(path))
        yield Document(text=text, messages=None, where=str(path))


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        yield from fh


def _jsonl_documents(source: SourceConfig, log: SkipLog) -> Iterator[Document]:
    for path in resolve_paths(source, log=log):
        try:
            lines = _open_lines(path)
            for lineno, raw in enumerate(lines, 1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                line, note = decode_bytes(raw, None, source.encoding_errors, where)
                if line is None:
                    log.skip(source.name, NON_UTF8, where, _bad_utf8(raw)[1])
                    continue
                if note:
                    log.note(source.name, note, where)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    log.skip(source.name, BAD_JSON, where, err.msg)
                    continue
                doc = record_document(record, source, where, log)
                if doc is not None:
                    yield doc
        except (OSError, EOFError) as err:  # unreadable or truncated (e.g. a cut .gz) file
            log.skip(source.name, UNREADABLE, str(path), str(err) or type(err).__name__)


def _parquet_documents(source: SourceConfig, log: SkipLog) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = source.messages_field or source.text_field
    for path in resolve_paths(source, log=log):
        try:
            pfile = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as err:
            log.skip(source.name, UNREADABLE, str(path), str(err).splitlines()[0] if str(err) else "")
            continue
        if field not in pfile.schema_arrow.names:
            log.skip(source.name, MISSING_FIELD, str(path),
                     f"no column {field!r} (columns: {pfile.schema_arrow.names})", count=pfile.metadata.num_rows)
            continue
        row = 0
        try:
            for batch in pfile.iter_batches(columns=[field]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    doc = record_document({field: value}, source, f"{path}[{row - 1}]", log)
                    if doc is not None:
                        yield doc
        except (OSError, pa.ArrowException) as err:
            rest = pfile.metadata.num_rows - row
            log.skip(source.name, UNREADABLE, f"{path}[{row}:]", str(err).splitlines()[0] if str(err) else "",
                     count=max(rest, 1))


def _hf_documents(source: SourceConfig, log: SkipLog) -> Iterator[Document]:
    import datasets

    try:
        data = datasets.load_dataset(source.dataset, source.config_name, data_dir=source.data_dir,
                                     data_files=source.data_files, split=source.split, streaming=source.streaming)
    except Exception as err:  # datasets raises many types; the message is what matters
        raise DataError(f"source {source.name!r}: cannot open dataset {source.dataset!r} "
                        f"(config {source.config_name!r}, split {source.split!r}): {err}") from err
    label = f"{source.dataset}:{source.split}"
    records = iter(data)
    i = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # the builder's own parse error (e.g. pyarrow on a "\ud800" escape) ends
            # the source: datasets cannot resume past it. Counted, so the run goes on with the other sources.
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.skip(source.name, UNREADABLE, f"{label}[{i}:]", f"the dataset stopped reading: {message}")
            return
        doc = record_document(record, source, f"{label}[{i}]", log)
        if doc is not None:
            yield doc
        i += 1


def record_document(record: Any, source: SourceConfig, where: str, log: SkipLog) -> Document | None:
    """The document in one JSON-like record, or None (counted in ``log``) if it has none."""
    if not isinstance(record, dict):
        log.skip(source.name, BAD_RECORD, where, f"expected an object, got {type(record).__name__}")
        return None
    if source.messages_field:
        if source.messages_field not in record:
            log.skip(source.name, MISSING_FIELD, where, f"no field {source.messages_field!r}")
            return None
        messages = record[source.messages_field]
        problem = messages_problem(messages)
        if problem:
            log.skip(source.name, BAD_MESSAGES, where, problem)
            return None
        return Document(text=None, messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                        where=where)
    if source.text_field not in record:
        log.skip(source.name, MISSING_FIELD, where, f"no field {source.text_field!r}")
        return None
    text = record[source.text_field]
    if text is None:
        log.skip(source.name, EMPTY, where, f"{source.text_field!r} is null")
        return None
    if not isinstance(text, str):
        log.skip(source.name, BAD_RECORD, where, f"{source.text_field!r} is {type(text).__name__}, not a string")
        return None
    return Document(text=text, messages=None, where=where)


def messages_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a usable chat (None if it is): a non-empty list of role/content strings."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is {type(message).__name__}, not an object"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or "\n" in role or "<|" in role:
            return f"message {i}: role must be a one-line string, got {role!r}"
        if not isinstance(content, str):
            return f"message {i}: content must be a string, got {type(content).__name__}"
    return None
