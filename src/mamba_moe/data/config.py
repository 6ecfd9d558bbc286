"""Configuration of ``data prepare``: a corpus mixture and how to cut it into token shards.

Dataclasses loaded from YAML, checked field by field: an unknown key is an error that suggests the
closest known one, so ``txt_field`` fails at once instead of silently reading nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SOURCE_KINDS = ("files", "jsonl", "parquet", "hf", "stdlib")
ENCODING_ERRORS = ("skip", "replace")
DTYPES = ("auto", "uint16", "uint32")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DataError(ValueError):
    """Bad data configuration or input; the message names the field, source or file."""


def _check_keys(data: Any, cls: type, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise DataError(f"{where}.{key}: unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")
                            + f" (known: {', '.join(names)})")
    return dict(data)


def _types(obj: Any, where: str, strings: tuple[str, ...] = (), optional_strings: tuple[str, ...] = (),
           flags: tuple[str, ...] = (), string_lists: tuple[str, ...] = ()) -> None:
    """Check the YAML types of fields, so ``streaming: "no"`` fails here rather than acting as True."""
    for name in strings + optional_strings:
        value = getattr(obj, name)
        if not (isinstance(value, str) and value) and not (value is None and name in optional_strings):
            raise DataError(f"{where}.{name}: must be a non-empty string (got {value!r})")
    for name in flags:
        if not isinstance(getattr(obj, name), bool):
            raise DataError(f"{where}.{name}: must be true or false (got {getattr(obj, name)!r})")
    for name in string_lists:
        value = getattr(obj, name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise DataError(f"{where}.{name}: must be a list of paths (got {value!r})")


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        raise DataError(f"{where}: {value!r} is not one of {list(allowed)}"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))


@dataclass
class SourceConfig:
    """One corpus of a mixture.

    ``kind``: "files" (each file one document; ``paths`` are files, folders or globs, folders searched
    with ``glob``), "jsonl" / "parquet" (one record one document, text in ``text_field`` or a chat in
    ``messages_field``), "hf" (``datasets.load_dataset(dataset, config_name, data_dir=..., data_files=...,
    split=..., streaming=...)``), "stdlib" (the running interpreter's standard-library ``*.py`` files).
    ``weight`` multiplies how often the loader samples this source relative to its size (1 = natural).
    ``max_docs`` caps the non-empty documents read from the source (counted before de-duplication).
    """

    name: str
    kind: str
    domain: str = "web"
    weight: float = 1.0
    paths: list[str] = field(default_factory=list)
    glob: str = "**/*"
    text_field: str = "text"
    messages_field: str | None = None
    dataset: str | None = None
    config_name: str | None = None
    data_dir: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    streaming: bool = True
    include_tests: bool = False
    site_packages: bool = False
    max_docs: int | None = None
    encoding_errors: str = "skip"

    def validate(self, where: str) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise DataError(f"{where}.name: {self.name!r} must be a file-name-safe identifier "
                            "(letters, digits, '_', '.', '-')")
        _choice(f"{where}.kind", self.kind, SOURCE_KINDS)
        if not isinstance(self.domain, str) or not _NAME.match(self.domain):
            raise DataError(f"{where}.domain: {self.domain!r} must be a short label such as code, math, web, chat")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not self.weight > 0:
            raise DataError(f"{where}.weight: must be a number > 0 (got {self.weight!r})")
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.kind in ("files", "jsonl", "parquet") and not self.paths:
            raise DataError(f"{where}.paths: a {self.kind!r} source needs at least one file, folder or glob")
        if self.kind == "hf" and not self.dataset:
            raise DataError(f"{where}.dataset: an 'hf' source needs a dataset name or builder "
                            "(e.g. 'json' with data_files)")
        if self.max_docs is not None and (not isinstance(self.max_docs, int) or self.max_docs <= 0):
            raise DataError(f"{where}.max_docs: must be a positive integer or null (got {self.max_docs!r})")
        _choice(f"{where}.encoding_errors", self.encoding_errors, ENCODING_ERRORS)
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        _types(self, where, strings=("text_field", "glob", "split"),
               optional_strings=("messages_field", "dataset", "config_name", "data_dir"),
               flags=("streaming", "include_tests", "site_packages"), string_lists=("paths", "data_files"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "source") -> SourceConfig:
        clean = _check_keys(data, cls, where)
        for key in ("name", "kind"):
            if key not in clean:
                raise DataError(f"{where}.{key}: required")
        try:
            return cls(**clean)
        except TypeError as err:
            raise DataError(f"{where}: {err}") from err


@dataclass
class PrepareConfig:
    """Everything ``data prepare`` needs: tokenizer, sources, output folder and how to shard.

    ``tokenizer`` is a tokenizer directory or a ``.gguf`` file. Documents go to validation with
    probability ``val_fraction``, decided from a hash of their content and ``seed`` (so the split does not
    depend on order, workers or which other documents exist). ``shard_mb`` is the UTF-8 text per shard.
    ``workers`` 0 means one per CPU core; 1 tokenizes in the main process.
    """

    tokenizer: str
    output: str
    sources: list[SourceConfig]
    seed: int = 0
    val_fraction: float = 0.01
    dedup: bool = True
    workers: int = 0
    shard_mb: float = 64.0
    min_chars: int = 1
    dtype: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s, f"sources[{i}]")
                        for i, s in enumerate(self.sources or [])]
        self.validate()

    def validate(self) -> None:
        for name in ("tokenizer", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"{name}: must be a path (got {getattr(self, name)!r})")
        if not self.sources:
            raise DataError("sources: the corpus needs at least one source")
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            source.validate(f"sources[{i}]")
            if source.name in seen:
                raise DataError(f"sources[{i}].name: {source.name!r} is used twice; names must be unique")
            seen.add(source.name)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise DataError(f"seed: must be an integer in [0, 2**63) (got {self.seed!r})")
        if not isinstance(self.val_fraction, int | float) or not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction: must be in [0, 1) (got {self.val_fraction!r})")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise DataError(f"workers: must be >= 0, 0 meaning one per core (got {self.workers!r})")
        if not isinstance(self.shard_mb, int | float) or not self.shard_mb > 0:
            raise DataError(f"shard_mb: must be > 0 (got {self.shard_mb!r})")
        if not isinstance(self.min_chars, int) or self.min_chars < 1:
            raise DataError(f"min_chars: must be an integer >= 1 (got {self.min_chars!r})")
        _choice("dtype", self.dtype, DTYPES)
        _types(self, "config", flags=("dedup", "progress"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareConfig:
        clean = _check_keys(data, cls, "config")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in clean]
        if missing:
            raise DataError(f"config: missing required key(s): {', '.join(missing)}")
        if not isinstance(clean["sources"], list):
            raise DataError("sources: expected a list of sources")
        return cls(**clean)

    @classmethod
    def load(cls, path: str | Path) -> PrepareConfig:
        """Read a YAML file; errors are prefixed with its path."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid YAML: {err}") from err
        try:
            return cls.from_dict(data)
        except DataError as err:
            raise DataError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

