"""What a training step minimises, and the set-up that needs: distillation teachers and domain routing.

Main loss: the model's LM cross-entropy over the targets, or with ``distill`` the distillation objective
``alpha * CE + (1 - alpha) * T^2 * KL`` against a live teacher (``distill.teacher``) or against teacher
top-k log-probs read from disk (``distill.topk_dir``). Aux: the model's router losses, plus
``domain_routing.coef`` times the mean domain-routing loss over the MoE layers.

Teacher top-k files are written only by ``mamba-moe distill topk`` (``distill_cli.py``): one command, run
once before training, rather than a hidden teacher pass inside the first training run that every rank
of a distributed run would have to wait for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..validation import ConfigError
from .batches import StepBatch, TrainData
from .config import TrainConfig


def domain_routing_table(cfg: TrainConfig, model_config: Any, domains: list[str]) -> Tensor | None:
    """Data domain index -> preferred expert (-1 = none), from ``domain_routing.experts``."""
    spec = cfg.domain_routing
    if spec is None:
        return None
    if "moe" not in model_config.layer_ffns:
        raise ConfigError("domain_routing: the model has no MoE layer (model layer_ffns has no 'moe')")
    for dom, idx in spec.experts.items():
        if dom not in domains:
            raise ConfigError(f"domain_routing.experts.{dom}: no such data domain (the data has {domains})")
        if idx >= model_config.moe_num_experts:
            raise ConfigError(f"domain_routing.experts.{dom}: expert {idx} out of range (the model has "
                              f"{model_config.moe_num_experts} routed experts)")
    return torch.tensor([spec.experts.get(d, -1) for d in domains], dtype=torch.long)


def topk_command(cfg: TrainConfig, data: TrainData) -> str:
    """The ``mamba-moe distill topk`` call that writes ``distill.topk_dir`` for this run's training windows."""
    spec = cfg.distill
    k = f" --k {spec.topk}" if spec.topk is not None else ""
    return (f"mamba-moe distill topk --teacher {spec.teacher} --data {data.shards} --seq-len {cfg.seq_len}{k} "
            f"--out {spec.topk_dir}")


def load_topk(cfg: TrainConfig, data: TrainData) -> Any:
    """The teacher top-k folder ``distill.topk_dir``, checked against this run's training windows."""
    from .distill import DistillationError
    from .teacher_topk import MANIFEST, TeacherTopK

    spec = cfg.distill
    if data.token_weighted:
        raise ConfigError("distill.topk_dir: precomputed top-k needs packed data (data.source stdlib or "
                          "shards), whose windows have ids; for chats, leave topk_dir unset")
    out = Path(spec.topk_dir)
    if not (out / MANIFEST).exists():
        raise ConfigError(f"distill.topk_dir: {out} holds no teacher top-k (no {MANIFEST}); write it first "
                          f"with `{topk_command(cfg, data)}`")
    try:
        topk = TeacherTopK(out)
    except DistillationError as err:
        raise ConfigError(f"distill.topk_dir: {err}") from err
    n = len(data.train_ds)
    seq_len = topk.manifest.get("metadata", {}).get("seq_len")
    if len(topk) != n or (seq_len is not None and seq_len != cfg.seq_len):
        raise ConfigError(f"distill.topk_dir: {out} holds {len(topk)} windows of seq_len {seq_len}, the training "
                          f"data {n} of {cfg.seq_len}; it was computed for other data or seq_len (rewrite it with "
                          f"`{topk_command(cfg, data)}`)")
    if spec.topk is not None and topk.k != spec.topk:
        raise ConfigError(f"distill.topk: {spec.topk}, but {out} holds the teacher's top-{topk.k}")
    return topk


def load_live_teacher(cfg: TrainConfig, data: TrainData, device: torch.device, amp: bool,
                      init_dir: Path | None) -> Any:
    """The teacher model ``distill.teacher`` on ``device``, checked to share the student's tokenizer."""
    from .distill import DistillationError, check_same_vocabulary, load_teacher

    spec = cfg.distill
    try:
        teacher = load_teacher(spec.teacher, device, torch.bfloat16 if amp else torch.float32)
    except DistillationError as err:
        raise ConfigError(f"distill.teacher: {err}") from err
    try:
        check_same_vocabulary(teacher.tokenizer, data.tokenizer)
    except DistillationError as err:
        where = cfg.data.tokenizer or (init_dir or data.shards or "the data's tokenizer")
        raise ConfigError(f"distill.teacher: {spec.teacher} vs the student tokenizer ({where}): {err}") from err
    return teacher


class Objective:
    """The loss of one micro-batch, and the forward evaluation shares with it (same autocast and routing)."""

    def __init__(self, cfg: TrainConfig, forward: Callable[..., Any], device: torch.device, amp: bool,
                 expert_table: Tensor | None = None, teacher: Any = None, topk: Any = None) -> None:
        self.cfg, self.call, self.device, self.amp = cfg, forward, device, amp
        self.expert_table, self.teacher, self.topk = expert_table, teacher, topk

    @property
    def distills(self) -> bool:
        return self.teacher is not None or self.topk is not None

    def forward(self, mb: StepBatch, logits: bool) -> Any:
        """The model's output for ``mb``: full logits, or (``logits=False``) the chunked loss alone."""
        kwargs: dict[str, Any] = {"attention_mask": mb.attention_mask}
        if self.expert_table is not None:
            experts = self.expert_table.to(mb.domain_ids.device)[mb.domain_ids]
            kwargs["expert_targets"] = experts[:, None].expand_as(mb.input_ids)
        if mb.document_ids is not None:
            kwargs["document_ids"] = mb.document_ids
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if logits:
                return self.call(mb.input_ids, **kwargs)
            return self.call(mb.input_ids, targets=mb.targets, return_logits=False, **kwargs)

    def loss(self, mb: StepBatch) -> tuple[Tensor, Tensor, dict[str, Tensor], Any]:
        """(main loss, aux, logged parts, router stats) of one micro-batch (see the module doc)."""
        out = self.forward(mb, logits=self.distills)
        parts: dict[str, Tensor] = {}
        if self.distills:
            from .distill import distillation_loss
            from .teacher_topk import topk_distillation_loss

            spec = self.cfg.distill
            if self.topk is not None:
                values, indices = self.topk.batch(mb.window_ids.tolist(), check_tokens=mb.input_ids)
                main, terms = topk_distillation_loss(out.logits, values.to(self.device), indices.to(self.device),
                                                     mb.targets, spec.alpha, spec.temperature)
            else:
                main, terms = distillation_loss(out.logits, self.teacher.logits(mb.input_ids), mb.targets,
                                                spec.alpha, spec.temperature)
            parts.update(terms)
        else:
            main = out.loss.float()
        aux = out.aux_loss.float() if out.aux_loss is not None else torch.zeros((), device=main.device)
        if self.expert_table is not None:
            dom = torch.stack([s.domain_loss for s in out.router_stats if s.domain_loss is not None]).mean()
            aux = aux + self.cfg.domain_routing.coef * dom
            parts["domain_loss"] = dom.detach()
        return main, aux, parts, out.router_stats


def build_objective(cfg: TrainConfig, data: TrainData, forward: Callable[..., Any], device: torch.device,
                    amp: bool, expert_table: Tensor | None, init_dir: Path | None) -> Objective:
    """The run's objective: plain LM loss, or distillation from a live teacher or from top-k on disk."""
    teacher = topk = None
    if cfg.distill is not None:
        if cfg.distill.topk_dir:
            topk = load_topk(cfg, data)
        else:
            teacher = load_live_teacher(cfg, data, device, amp, init_dir)
    return Objective(cfg, forward, device, amp, expert_table, teacher, topk)
