"""Configuration of ``data prepare``: a corpus mixture and how to cut it into token shards.

Dataclasses loaded from YAML, checked field by field: an unknown key is an error that suggests the
closest known one, so ``txt_field`` fails at once instead of silently reading nothing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .. import validation
from ..user_text import InvalidTextError, decode_text
from ..validation import ConfigError

T = TypeVar("T")

SOURCE_KINDS = ("files", "jsonl", "parquet", "hf", "stdlib")
ENCODING_ERRORS = ("skip", "replace")
DTYPES = ("auto", "uint16", "uint32")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DataError(ConfigError):
    """Bad data configuration or input; the message names the field, source or file.

    A :class:`mamba_moe.validation.ConfigError` (so one ``except`` covers every configuration), raised
    here under its own name so callers can tell a data problem from a model or training one.
    """


def _data_errors(check: Callable[..., T]) -> Callable[..., T]:
    """``check`` from :mod:`mamba_moe.validation`, raising :class:`DataError` with the same message."""
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return check(*args, **kwargs)
        except DataError:
            raise
        except ConfigError as err:
            raise DataError(str(err)) from None
    wrapped.__doc__ = check.__doc__
    return wrapped


_check_keys = _data_errors(validation.check_keys)
_check_choice = _data_errors(validation.check_choice)
_check_bool = _data_errors(validation.check_bool)
_check_int = _data_errors(validation.check_int)
_check_number = _data_errors(validation.check_number)
_check_str = _data_errors(validation.check_str)
_check_str_list = _data_errors(validation.check_str_list)
_build = _data_errors(validation.build_dataclass)


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
        _check_choice(f"{where}.kind", self.kind, SOURCE_KINDS)
        if not isinstance(self.domain, str) or not _NAME.match(self.domain):
            raise DataError(f"{where}.domain: {self.domain!r} must be a short label such as code, math, web, chat")
        _check_number(f"{where}.weight", self.weight, minimum=0, min_open=True)
        self.paths = _check_str_list(f"{where}.paths", self.paths, what="a list of paths")
        if self.kind in ("files", "jsonl", "parquet") and not self.paths:
            raise DataError(f"{where}.paths: a {self.kind!r} source needs at least one file, folder or glob")
        self.data_files = _check_str_list(f"{where}.data_files", self.data_files, optional=True,
                                          what="a list of paths")
        for name in ("text_field", "glob", "split"):
            _check_str(f"{where}.{name}", getattr(self, name))
        for name in ("messages_field", "dataset", "config_name", "data_dir"):
            _check_str(f"{where}.{name}", getattr(self, name), optional=True)
        if self.kind == "hf" and not self.dataset:
            raise DataError(f"{where}.dataset: an 'hf' source needs a dataset name or builder "
                            "(e.g. 'json' with data_files)")
        for name in ("streaming", "include_tests", "site_packages"):
            _check_bool(f"{where}.{name}", getattr(self, name))
        _check_int(f"{where}.max_docs", self.max_docs, minimum=1, optional=True)
        _check_choice(f"{where}.encoding_errors", self.encoding_errors, ENCODING_ERRORS)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "source") -> SourceConfig:
        return _build(cls, data, where, list_known=True)


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
            _check_str(name, getattr(self, name), what="a path")
        if not isinstance(self.sources, list) or not self.sources:
            raise DataError("sources: the corpus needs at least one source")
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            source.validate(f"sources[{i}]")
            if source.name in seen:
                raise DataError(f"sources[{i}].name: {source.name!r} is used twice; names must be unique")
            seen.add(source.name)
        _check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        _check_number("val_fraction", self.val_fraction, minimum=0, maximum=1, max_open=True)
        _check_int("workers", self.workers, minimum=0)
        _check_number("shard_mb", self.shard_mb, minimum=0, min_open=True)
        _check_int("min_chars", self.min_chars, minimum=1)
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("dedup", "progress"):
            _check_bool(name, getattr(self, name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareConfig:
        data = _check_keys(data, validation.field_names(cls), "config", list_known=True)
        if "sources" in data and not isinstance(data["sources"], list):
            raise DataError("sources: expected a list of sources")
        return _build(cls, data, "config")

    @classmethod
    def load(cls, path: str | Path) -> PrepareConfig:
        """Read a YAML file; errors are prefixed with its path."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(decode_text(path.read_bytes(), str(path)))
        except InvalidTextError as err:
            raise DataError(str(err)) from None
        except yaml.YAMLError as err:
            raise DataError(f"{path}: not valid YAML: {err}") from err
        try:
            return cls.from_dict(data)
        except DataError as err:
            raise DataError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

