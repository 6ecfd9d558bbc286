"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), as text.

A context lists ``pairs`` key-value pairs (random four-letter keys, three-digit values); each of
``queries`` keys is then asked for, one generation each, and the first number of the answer must be its
value. It is the synthetic task that separates attention (exact lookup) from a fixed-size recurrent
state. Queries of one context are not independent, so the interval is a bootstrap over contexts.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..backends.base import Backend, GenRequest
from ..errors import EvalError
from ..stats import clustered_interval, wilson_interval
from .base import Item, Option, Task, positive_int
from .synthetic import rng, score_first_integer

HEADER = "Remember the value of each key.\n"
RECALL = "\nNow recall the values.\n"


def make_context(seed: int, index: int, pairs: int) -> list[tuple[str, int]]:
    r = rng("mqar", seed, index)
    keys: list[str] = []
    while len(keys) < pairs:
        key = "".join(r.choice(string.ascii_lowercase) for _ in range(4))
        if key not in keys:
            keys.append(key)
    return [(k, r.randint(100, 999)) for k in keys]


class MQAR(Task):
    name = "mqar"
    metric = "accuracy"
    OPTIONS = {
        "pairs": Option(positive_int, 16, "key-value pairs per context"),
        "queries": Option(positive_int, 4, "keys asked per context (<= pairs)"),
        "contexts": Option(positive_int, 25, "contexts (--limit cuts the queries)"),
        "max_tokens": Option(positive_int, 6, "tokens generated per answer"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.options["queries"] > self.options["pairs"]:
            raise EvalError(f"--set mqar.queries: at most mqar.pairs ({self.options['pairs']}), "
                            f"got {self.options['queries']}")

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        out = []
        for c in range(self.options["contexts"]):
            pairs = make_context(self.seed, c, self.options["pairs"])
            listing = "".join(f"{k}: {v}\n" for k, v in pairs)
            asked = rng("mqar-queries", self.seed, c).sample(range(len(pairs)), self.options["queries"])
            for q, i in enumerate(asked):
                key, value = pairs[i]
                if self.chat:
                    content = (f"{HEADER}{listing}\nWhat is the value of the key '{key}'? Reply with the number "
                               "only.")
                    request = GenRequest(messages=(("user", content),), max_tokens=self.options["max_tokens"])
                else:
                    request = GenRequest(prompt=f"{HEADER}{listing}{RECALL}{key}:",
                                         max_tokens=self.options["max_tokens"], stop=("\n",))
                out.append(Item(f"mqar/{c}/{q}", request, value, {"context": c, "position": i}))
        return out[:limit]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "decoding": "greedy"}

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        return score_first_integer([item.target for item in items], outputs)

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        clusters: dict[int, list[bool]] = defaultdict(list)
        for r in records:
            clusters[r["meta"]["context"]].append(bool(r["verdict"]["correct"]))
        units = list(clusters.values())

        def accuracy(us: Sequence[list[bool]]) -> float:
            return sum(map(sum, us)) / max(1, sum(map(len, us)))

        n = len(records)
        if len(units) >= 2:
            interval = clustered_interval(units, accuracy, accuracy(units))
            how = "bootstrap over contexts, at least Wilson with one observation per context"
        else:   # one context: no spread between contexts to resample; the queries' Wilson interval (too narrow)
            interval, how = wilson_interval(sum(map(sum, units)), n), "Wilson over queries (one context)"
        return {"value": accuracy(units) if n else None, "ci95": list(interval), "n": n, "contexts": len(units),
                "interval": how}
