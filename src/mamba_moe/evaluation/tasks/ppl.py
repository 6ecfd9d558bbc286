"""Perplexity and bits per byte on held-out text, per domain.

Bits per byte (total negative log-likelihood in bits / UTF-8 bytes of the text) is the headline, since it
compares models with different tokenizers; token perplexity (exp of the mean NLL per token) is reported
beside it for the model's own tokenizer. Each document is scored on its own (prefix: the end-of-text
token, as after a document boundary in training), in rolling windows of the model's context so every
token is predicted once with as much context as fits.

Text: ``--set ppl.data=PATH`` with a ``.jsonl`` of ``{"text": ..., "domain": ...}`` records, a text file
(one document, its name the domain) or a folder of them. By default, the standard-library Python files
that ``data prepare`` puts in the validation split with its default seed 0 and ``val_fraction`` 0.01
(``configs/data/stdlib.yaml``): held out from the embedded corpus, not from anything else, and a model
trained elsewhere may well have seen them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..data import read_jsonl
from ..errors import EvalError
from ..stats import bootstrap_interval
from .base import Item, Option, RollingRequest, Task, positive_int

LN2 = math.log(2)


def stdlib_heldout(seed: int = 0, val_fraction: float = 0.01) -> list[tuple[str, str, str]]:
    """(id, domain, text) of the stdlib files that the data split sends to validation."""
    from ...data.sources import stdlib_files
    from ...data.split import content_digest, is_validation

    out = []
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and is_validation(content_digest(text), seed, val_fraction):
            out.append((path.name, "python-stdlib", text))
    return out


def load_documents(spec: str) -> list[tuple[str, str, str]]:
    path = Path(spec)
    if not path.exists():
        raise EvalError(f"--set ppl.data={spec}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [doc for f in files for doc in load_documents(str(f))]
    if path.suffix in (".jsonl", ".gz"):
        docs = []
        for i, rec in enumerate(read_jsonl(path)):
            if not isinstance(rec.get("text"), str):
                raise EvalError(f"{path}: record {i + 1}: expected a string field 'text'")
            docs.append((f"{path.name}:{i}", str(rec.get("domain") or path.stem), rec["text"]))
        return docs
    try:
        return [(path.name, path.stem, path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text ({err})") from None


class Perplexity(Task):
    name = "ppl"
    metric = "bits_per_byte"
    needs_scoring = True
    OPTIONS = {
        "data": Option(str, None, "held-out text: .jsonl {text, domain}, a text file or a folder"),
        "max_chars": Option(positive_int, 20_000, "documents are cut to their first max_chars characters"),
    }

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["data"] = settings["data"] or "stdlib held-out (data split seed 0, val_fraction 0.01)"
        settings.pop("mode")
        return settings

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        docs = load_documents(self.options["data"]) if self.options["data"] else stdlib_heldout()
        if not docs:
            raise EvalError("ppl: no documents to score")
        out = []
        for doc_id, domain, text in docs[:limit]:
            text = text[: self.options["max_chars"]]
            out.append(Item(f"ppl/{doc_id}", RollingRequest(text), None,
                            {"domain": domain, "bytes": len(text.encode("utf-8"))}))
        return out

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        verdicts = []
        for item, out in zip(items, outputs, strict=True):
            nbytes = item.meta["bytes"]
            verdicts.append({"score": out.nll / LN2 / nbytes if nbytes else None, "nll": out.nll,
                             "tokens": out.tokens, "bytes": nbytes})
        return verdicts

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
            units = [(r["verdict"]["nll"], r["verdict"]["tokens"], r["verdict"]["bytes"]) for r in rs]
            nll, tokens, nbytes = (sum(u[i] for u in units) for i in range(3))

            def bpb(us: Sequence[tuple[float, int, int]]) -> float:
                return sum(u[0] for u in us) / LN2 / max(1, sum(u[2] for u in us))

            return {"value": nll / LN2 / nbytes if nbytes else None, "ci95": list(bootstrap_interval(units, bpb)),
                    "n": len(units), "token_perplexity": math.exp(nll / tokens) if tokens else None,
                    "tokens": tokens, "bytes": nbytes}

        by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_domain[r["meta"]["domain"]].append(r)
        result = summary(records)
        result["domains"] = {d: summary(rs) for d, rs in sorted(by_domain.items())}
        return result
