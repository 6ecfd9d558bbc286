"""Running tasks on a backend: items in batches, each finished batch cached, then the report.

    report = run_eval(backend, ["gsm8k", "passkey"], "runs/eval", limit=50, seed=0)

An interrupted run (Ctrl-C, a kill, a crash) resumes from ``samples/<task>.jsonl``: finished samples are
read back, not recomputed, and the report is the same as that of a run that never stopped. A task whose
items depend on other items' answers (MT-Bench-local: turn 2 sees turn 1, the judge sees both) hands them
over in rounds (``Task.followups``), each cached the same way; items may be answered by a helper model
the task names (its judge) instead of the model under evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .backends.base import Backend, ChoiceRequest, ChoiceResult, GenRequest, GenResult
from .cache import SampleCache, sample_key
from .errors import EvalError
from .report import harness_versions, write_report
from .tasks import Item, Task, task_class
from .tasks.base import MODEL, RollingRequest

REPORT_FORMAT = "mamba-moe-eval"
REPORT_VERSION = 1


def parse_sets(values: Sequence[str], tasks: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--set TASK.NAME=VALUE`` flags as {task: {name: value}} (the task must be one of ``tasks``)."""
    out: dict[str, dict[str, str]] = {}
    for text in values:
        name, eq, value = text.partition("=")
        task, dot, key = name.partition(".")
        if not eq or not dot or not task or not key:
            raise EvalError(f"--set {text}: expected TASK.OPTION=VALUE, e.g. gsm8k.num_fewshot=5")
        if task not in tasks:
            raise EvalError(f"--set {text}: task {task!r} is not among --tasks ({', '.join(tasks)})")
        out.setdefault(task, {})[key] = value
    return out


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def _record(task: Task, item: Item, key: str, output: Any, verdict: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"id": item.id, "key": key, "task": task.name, **item.request.to_json()}
    if isinstance(output, GenResult):
        record.update(output=output.text, finish_reason=output.finish_reason)
        if output.error:
            record["error"] = output.error
    elif isinstance(output, ChoiceResult):
        record.update(logprobs=list(output.logprobs), answer_tokens=list(output.tokens))
        if output.error:
            record["error"] = output.error
    record.update(target=item.target, meta=_public(item.meta), verdict=verdict)
    return record


def _run_batch(backend: Backend, items: Sequence[Item]) -> list[Any]:
    requests = [item.request for item in items]
    if all(isinstance(r, GenRequest) for r in requests):
        return backend.generate(requests)  # type: ignore[arg-type]
    if all(isinstance(r, RollingRequest) for r in requests):
        return backend.rolling_loglikelihood([r.text for r in requests])  # type: ignore[union-attr]
    if all(isinstance(r, ChoiceRequest) for r in requests):
        return backend.choose(requests)  # type: ignore[arg-type]
    raise TypeError("a batch mixes request kinds")


def _identity(backend: Backend) -> dict[str, Any]:
    return {"model": backend.info.model, "kind": backend.info.kind,
            "digest": backend.info.details.get("digest"), "dtype": backend.info.details.get("dtype")}


def run_task(task: Task, backend: Backend | dict[str, Backend], output: Path, limit: int | None, batch_size: int,
             progress: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """(the task's report entry, {"cached", "computed"} counts). ``backend``: the model under evaluation, or
    {name: backend} with the model under ``"model"`` and the task's helpers (a judge) beside it.

    Items run in rounds: the task's items, then its ``followups`` of each finished round. Within a round the
    items of each backend run in batches; every finished batch is cached at once."""
    backends = backend if isinstance(backend, dict) else {MODEL: backend}
    items = task.items(backends[MODEL], limit)
    settings = task.cache_settings()
    cache = SampleCache(output / "samples" / f"{task.name}.jsonl")
    stored = cache.load()
    done: dict[str, dict[str, Any]] = {}
    ids: list[str] = []
    cached = computed = 0
    bar = tqdm(total=0, desc=task.name, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        while items:
            round_ids = [item.id for item in items]
            if len(set(round_ids)) != len(round_ids) or set(round_ids) & set(ids):
                raise RuntimeError(f"{task.name}: duplicate item ids")
            ids += round_ids
            keys = {item.id: sample_key({"request": item.request.to_json(), "target": item.target,
                                         "meta": item.meta, "settings": settings,
                                         "model": _identity(backends[item.backend])}) for item in items}
            reused = {i: stored[i] for i in round_ids if i in stored and stored[i].get("key") == keys[i]}
            done.update(reused)
            pending = [item for item in items if item.id not in reused]
            cached, computed = cached + len(reused), computed + len(pending)
            bar.total += len(items)
            bar.update(len(reused))
            for name in dict.fromkeys(item.backend for item in pending):   # each backend's items, in order
                mine = [item for item in pending if item.backend == name]
                for start in range(0, len(mine), batch_size):
                    chunk = mine[start:start + batch_size]
                    outputs = _run_batch(backends[name], chunk)
                    verdicts = task.score(chunk, outputs)
                    records = [_record(task, item, keys[item.id], out, v)
                               for item, out, v in zip(chunk, outputs, verdicts, strict=True)]
                    cache.append(records)
                    done.update((r["id"], r) for r in records)
                    bar.update(len(chunk))
            items = task.followups([(item, done[item.id]) for item in items])
    finally:
        bar.close()
    ordered = [done[i] for i in ids]
    entry = {"metric": task.metric, **task.aggregate(ordered), "settings": task.settings(),
             "samples": f"samples/{task.name}.jsonl"}
    return entry, {"cached": cached, "computed": computed}


def open_helpers(task: Task, backend: Backend, opened: dict[str, Backend],
                 open_model: Callable[[str], Backend]) -> dict[str, Backend]:
    """{name: backend} of ``task.helpers()``: "self" is ``backend``; other MODEL strings are opened with
    ``open_model`` once per run (``opened`` keeps them, for other tasks and for closing)."""
    helpers = {}
    for name, spec in task.helpers().items():
        if spec == "self":
            helpers[name] = backend
            continue
        if spec not in opened:
            opened[spec] = open_model(spec)
        helpers[name] = opened[spec]
    return helpers


def run_eval(backend: Backend, tasks: Sequence[str], output: str | Path, *, model: str | None = None,
             limit: int | None = None, seed: int = 0, chat: bool = False,
             options: dict[str, dict[str, str]] | None = None, data_dir: str | None = None, batch_size: int = 16,
             progress: bool = False, open_model: Callable[[str], Backend] | None = None) -> dict[str, Any]:
    """Run ``tasks`` on ``backend``, caching samples under ``output``; write and return the report.

    ``open_model`` opens the MODEL strings that tasks name as helpers (a judge); by default
    ``backends.open_backend`` with its defaults. Helpers opened here are closed before returning."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit: must be a positive integer, got {limit}")
    output = Path(output)
    options = options or {}
    built = [task_class(name)(options.get(name), seed=seed, chat=chat, data_dir=data_dir) for name in tasks]
    if open_model is None:
        from .backends import open_backend as open_model
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "model": {"spec": model or backend.info.model, "kind": backend.info.kind, "name": backend.info.model,
                  "details": backend.info.details, "max_context": backend.max_context},
        "harness": harness_versions(),
        "settings": {"seed": seed, "limit": limit, "mode": "chat" if chat else "base", "tasks": list(tasks)},
        "tasks": {},
        "run": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tasks": {}},
    }
    opened: dict[str, Backend] = {}
    try:
        for task in built:
            reason = task.cannot_run_on(backend)
            if reason is not None:
                report["tasks"][task.name] = {"metric": task.metric, "value": None, "ci95": [None, None], "n": 0,
                                              "skipped": reason}
                continue
            started = time.monotonic()
            helpers = open_helpers(task, backend, opened, open_model)
            task.attach(helpers)
            entry, counts = run_task(task, {MODEL: backend, **helpers}, output, limit, batch_size, progress)
            report["tasks"][task.name] = entry
            report["run"]["tasks"][task.name] = {**counts, "seconds": round(time.monotonic() - started, 2)}
    finally:
        for helper in opened.values():
            helper.close()
    report["run"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_report(output, report)
    return report
