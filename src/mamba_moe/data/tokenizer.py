"""Byte-level BPE tokenizers: train, save as an HF directory, load (directory or GGUF), hash.

The pre-tokenizer is the Llama-3 split (letters, digits in groups of at most three, punctuation runs,
newlines), written byte for byte as llama.cpp implements it under the name ``llama-bpe``
(``LLAMA_VOCAB_PRE_TYPE_LLAMA3`` in ``src/llama-vocab.cpp``). llama.cpp does not read the regex from a
GGUF file, it re-implements it from ``tokenizer.ggml.pre``; a tokenizer with an unnamed regex would split
text differently on the phone than in training. The BPE model sets ``ignore_merges`` because llama.cpp
does for this pre-tokenizer (a pre-token that is itself in the vocabulary becomes that one token).

Special tokens and their ids are fixed by the team: ``<|pad|>`` 0, ``<|endoftext|>`` 1 (document
separator), ``<|im_start|>`` 2, ``<|im_end|>`` 3; chats use the ChatML template. Both are defined once,
in :mod:`mamba_moe.data.chatml`.

:func:`load_tokenizer` is the one loader for a tokenizer directory (``tokenizer.json``, as saved by
:func:`save_tokenizer` or found in a checkpoint) or a ``.gguf`` file; training, data and inference use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..atomic import atomic_directory

# The special tokens, their ids and the chat template live in .chatml; re-exported here for callers that
# know them as tokenizer settings.
from .chatml import (  # noqa: F401
    CHAT_TEMPLATE,
    END_TOKENS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
)

# llama.cpp's name for the pre-tokenizer below: write it as ``tokenizer.ggml.pre`` when exporting GGUF.
# ("qwen2" is the same split with single digits, ``\p{N}`` instead of ``\p{N}{1,3}``.)
LLAMA_CPP_PRE = "llama-bpe"
# Byte-identical to the regex llama.cpp compiles for LLAMA_VOCAB_PRE_TYPE_LLAMA3 ("adapted" form, PR 6920):
# the case-insensitive contractions are spelled as [sS] classes, so no Unicode case folding (e.g. 'ſ) differs.
LLAMA3_SPLIT_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

DEFAULT_VOCAB_SIZE = 32000
# Longest pre-token that BPE sees whole, in training and in bulk encoding (encode.py). BPE's cost grows
# with the pre-token: ~200 bytes of memory per character to encode one, and worse than quadratic time to
# train on one (a 200k-character run of '~' took 23 s, 400k 164 s, 16 MB would take days). Real text has
# none this long (the 3.11 standard library's longest, tests included, is 201 characters).
MAX_PRETOKEN_CHARS = 4096
CACHE_ENV = "MAMBA_MOE_CACHE"


class TokenizerError(ValueError):
    """A tokenizer cannot be built, found or loaded; the message names the file or setting."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer's path or its ``tokenizer.json`` does not exist (also a ``FileNotFoundError``)."""


# ---- building and training ------------------------------------------------------------------------

def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the llama-bpe pre-tokenizer, no normalizer and no BOS/EOS added.

    No normalizer, so decode(encode(text)) == text for any Unicode string; no post-processor, so
    ``encode`` adds nothing (documents get their ``<|endoftext|>`` from the data pipeline).
    """
    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
                    show_progress: bool = False, length: int | None = None) -> Any:
    """Train a byte-level BPE of ``vocab_size`` tokens (special tokens and the 256 bytes included).

    Returns a ``transformers`` fast tokenizer with the special tokens and chat template set, ready for
    :func:`save_tokenizer`. On a small corpus the vocabulary may end smaller than asked (no more pairs
    occur ``min_frequency`` times); ``len(tokenizer)`` is the truth.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise TokenizerError(f"vocab_size: must be an integer >= {minimum} (4 special tokens + 256 bytes), "
                             f"got {vocab_size!r}")
    if vocab_size > 2**32:
        raise TokenizerError(f"vocab_size: {vocab_size} does not fit uint32 token ids")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    seen = _CountingIterator(texts)
    tok.train_from_iterator(_without_long_runs(seen), trainer=trainer, length=length)
    if seen.count == 0:
        raise TokenizerError("training corpus: no text given (an empty corpus cannot train a tokenizer)")
    return wrap_tokenizer(tok)


class _CountingIterator:
    """Passes strings through, counting them, so an empty corpus is reported rather than trained on."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._it = iter(texts)
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = next(self._it)
        if not isinstance(text, str):
            raise TokenizerError(f"training corpus: expected str documents, got {type(text).__name__}")
        self.count += 1
        return text


def _without_long_runs(texts: Iterable[str]) -> Iterator[str]:
    """``texts``, each one cut into several where it holds a run of letters, of punctuation or of whitespace
    longer than :data:`MAX_PRETOKEN_CHARS` (the only pre-tokens the split patterns leave unbounded).

    The trainer never joins pre-tokens across texts, so every piece of such a run is at most that long; the
    counts it learns from change only around the cuts. Texts without such a run pass unchanged.
    """
    import regex

    limit = MAX_PRETOKEN_CHARS
    runs = regex.compile(rf"\p{{L}}{{{limit + 1},}}|[^\s\p{{L}}\p{{N}}]{{{limit + 1},}}|\s{{{limit + 1},}}")
    for text in texts:
        if len(text) <= limit:
            yield text
            continue
        start = 0
        for run in runs.finditer(text):
            for cut in range(run.start() + limit, run.end(), limit):
                yield text[start:cut]
                start = cut
        yield text[start:]


def wrap_tokenizer(tok: Tokenizer) -> Any:
    """The ``transformers`` tokenizer around a trained ``tokenizers.Tokenizer`` (ids of specials checked)."""
    from transformers import PreTrainedTokenizerFast

    for want, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != want:
            raise TokenizerError(f"special token {token}: id {got}, the convention needs {want}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=ENDOFTEXT, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30,
    )


# ---- saving and loading ---------------------------------------------------------------------------

def save_tokenizer(tokenizer: Any, path: str | os.PathLike) -> Path:
    """Write ``tokenizer`` as an ``AutoTokenizer`` directory at ``path``, atomically (all files or none).

    The directory is the format checkpoints carry beside ``config.json``; an existing one is replaced.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return path


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A ``transformers`` tokenizer from a directory holding ``tokenizer.json``, or from a GGUF file.

    The directory may be a saved tokenizer or a checkpoint (weights and ``config.json`` beside it). Nothing
    is downloaded and nothing is converted: without ``tokenizer.json`` the error says exactly that
    (transformers would otherwise try to build one from ``tokenizer_config.json`` and ask for
    sentencepiece or tiktoken). GGUF reading needs the ``gguf`` package.
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerNotFoundError(f"{path}: tokenizer not found (expected a directory holding tokenizer.json, "
                                     "or a .gguf file)")
    if path.is_file():
        return _load_gguf_tokenizer(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise TokenizerNotFoundError(f"{file}: not found; a tokenizer directory needs tokenizer.json (train one "
                                     "with `mamba-moe data train-tokenizer`, save it beside a checkpoint's "
                                     "weights, or point at a .gguf file)")
    try:  # fail here, naming the file, rather than inside transformers' fallbacks
        Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({err})") from err
    from transformers import AutoTokenizer, PretrainedConfig

    # In a checkpoint, a neutral config keeps transformers from parsing our config.json as an HF model
    # config (transformers 5 does so for an unregistered model_type, and fails on it).
    extra = {"config": PretrainedConfig()} if (path / "config.json").exists() else {}
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **extra)
    except (OSError, ValueError) as err:  # e.g. a malformed tokenizer_config.json
        raise TokenizerError(f"{path}: cannot load the tokenizer: {err}") from err


def _load_gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if path.suffix.lower() != ".gguf":
        raise TokenizerError(f"{path}: a tokenizer file must be a .gguf model; otherwise give the directory "
                             "that holds tokenizer.json")
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as err:
        raise TokenizerError(f"{path}: reading a GGUF tokenizer needs the 'gguf' package "
                             "(pip install gguf)") from err
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def backend(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind an HF tokenizer (or the argument itself if it is one)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    inner = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(inner, Tokenizer):
        raise TokenizerError(f"tokenizer: expected a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}")
    return inner


def canonical_json(tokenizer: Any) -> str:
    """The tokenizer.json content with sorted keys and no whitespace, minus runtime padding/truncation.

    Padding and truncation are per-call settings that HF tokenizers write into the backend; they change
    no token id of an encoded document, so they must not change the hash.
    """
    data = json.loads(backend(tokenizer).to_str())
    data["padding"] = None
    data["truncation"] = None
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 (hex) of :func:`canonical_json`: equal hashes mean equal token ids for every text."""
    return hashlib.sha256(canonical_json(tokenizer).encode("utf-8")).hexdigest()


def raw_copy(tokenizer: Any, encode_special_tokens: bool = True) -> Tokenizer:
    """A private ``tokenizers.Tokenizer`` copy for bulk encoding, without padding or truncation.

    With ``encode_special_tokens`` a literal ``<|endoftext|>`` inside a document is encoded as text, so
    document content can never forge a separator or a chat turn; only the pipeline inserts special ids.
    """
    tok = Tokenizer.from_str(backend(tokenizer).to_str())
    tok.no_padding()
    tok.no_truncation()
    tok.encode_special_tokens = encode_special_tokens
    return tok


def llama_cpp_pre_name(tokenizer: Any) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` name for this tokenizer's pre-tokenizer, or None if unknown.

    Recognises the two splits this project allows: "llama-bpe" (``LLAMA3_SPLIT_REGEX`` + byte-level) and
    "gpt2" (plain byte-level with GPT-2's built-in regex).
    """
    inner = backend(tokenizer).pre_tokenizer
    pre = json.loads(inner.__getstate__()) if inner is not None else {}  # just this part, not the vocabulary
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt2"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT_REGEX
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return LLAMA_CPP_PRE
    return None


# ---- special tokens -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecialIds:
    """Ids the pipeline inserts itself: document separator, padding and the two chat turn markers."""

    eos: int
    pad: int
    im_start: int | None
    im_end: int | None


def special_ids(tokenizer: Any) -> SpecialIds:
    """Special ids of any tokenizer: ours by the convention's token strings, a teacher's by its own.

    The separator is ``<|endoftext|>`` when the vocabulary has it (SmolLM2 does), else the tokenizer's EOS.
    Padding falls back to the separator (padded positions are masked anyway).
    """
    tok = backend(tokenizer)
    eos = tok.token_to_id(ENDOFTEXT)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise TokenizerError("tokenizer: has neither <|endoftext|> nor an eos_token; cannot separate documents")
    pad = tok.token_to_id(PAD)
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
    return SpecialIds(eos=eos, pad=eos if pad is None else pad,
                      im_start=tok.token_to_id(IM_START), im_end=tok.token_to_id(IM_END))


def token_dtype_bits(vocab_size: int) -> int:
    """16 when every id fits uint16 (vocab <= 65,536), else 32."""
    return 16 if vocab_size <= 1 << 16 else 32


def vocab_size_of(tokenizer: Any) -> int:
    """Number of ids, added tokens included (the largest id + 1)."""
    return backend(tokenizer).get_vocab_size(with_added_tokens=True)


# ---- the embedded-corpus tokenizer ----------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$MAMBA_MOE_CACHE`` or ``~/.cache/mamba_moe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mamba_moe")


def stdlib_tokenizer(vocab_size: int = 8192, max_bytes: int = 8_000_000, cache_dir: str | os.PathLike | None = None,
                     show_progress: bool = False) -> Any:
    """A tokenizer trained on the running interpreter's standard library, cached on disk.

    For demos and tests that need a real code tokenizer without a download. Trains on the first
    ``max_bytes`` of the stdlib's ``*.py`` files (tests excluded, sorted by path, so the subset is the same
    on every run of this interpreter); the result is cached under ``cache_dir`` keyed by the Python version
    and the settings, and reused while it loads and hashes as written.
    """
    import sys

    from .sources import stdlib_files

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    key = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}-b{max_bytes}"
    target = cache / key
    stamp = target / "mamba_moe_tokenizer_hash.txt"
    if stamp.exists():
        try:
            tok = load_tokenizer(target)
            if tokenizer_hash(tok) == stamp.read_text().strip():
                return tok
        except (OSError, ValueError):
            pass  # a damaged cache entry: retrain below

    def texts() -> Iterator[str]:
        budget = max_bytes
        for path in stdlib_files():
            if budget <= 0:
                return
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            budget -= len(text.encode("utf-8"))
            yield text

    tok = train_tokenizer(texts(), vocab_size=vocab_size, show_progress=show_progress)
    save_tokenizer(tok, target)
    (target / "mamba_moe_tokenizer_hash.txt").write_text(tokenizer_hash(tok) + "\n")
    return load_tokenizer(target)
