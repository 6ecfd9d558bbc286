"""The training loop: data, model, AdamW, schedule, accumulation, clipping, eval, checkpoints, exact resume.

One ``Trainer`` per run. ``setup()`` builds everything (so tests can reach in before ``train()``);
``train(resume=True)`` continues from the newest checkpoint with bitwise-identical results on CPU.
Options layered on the plain LM loss (each off unless configured): starting weights from another run
(``init_from``), logit distillation (``distill``), quantization-aware training (``qat``), domain-guided
routing (``domain_routing``), activation checkpointing, DDP or FSDP2 under torchrun, TensorBoard.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from ..config import ConfigError, MambaMoEConfig
from ..data.tokenizer import vocab_size_of
from ..model import MambaMoEForCausalLM
from .batches import IGNORE_INDEX, StepBatch, TrainData
from .checkpoint import (
    latest_checkpoint,
    load_plain_weights,
    load_state,
    resolve_init_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_weights,
)
from .config import TrainConfig
from .distributed import DistInfo, barrier, init_distributed, mean_across_ranks, sum_across_ranks
from .metrics import MetricsWriter
from .optim import build_optimizer, no_decay
from .schedule import lr_at


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)   # per optimizer step, this invocation
    val: dict[str, float] = field(default_factory=dict)  # last validation: loss, ppl, per domain
    checkpoint: Path | None = None
    shards: Path | None = None
    tokens_per_s: float = 0.0
    quantized: Path | None = None                        # QAT: the converted (quantized-weights) checkpoint


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self.device = _device(cfg)
        self.amp = self.device.type == "cuda" and cfg.dtype in ("auto", "bf16")
        self.step = 0
        self.dist = DistInfo()
        self.parallel = "none"       # none | ddp | fsdp
        self.teacher: Any = None
        self.topk: Any = None
        self.last_checkpoint: Path | None = None

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.init_dir = resolve_init_checkpoint(cfg.init_from) if cfg.init_from else None
        self.data = TrainData(cfg, self.dist, self.init_dir, self.log)
        self.tokenizer, self.shards = self.data.tokenizer, self.data.shards
        self.train_ds = self.data.train_ds
        self.model = self._build_model()
        self.qat_names: list[str] = []
        if cfg.qat is not None:
            from .qat import prepare_qat

            self.qat_names = prepare_qat(self.model, bits=cfg.qat.bits, group_size=cfg.qat.group_size)
        self._expert_table = self._domain_routing_table()
        keep = {name for name, p in self.model.named_parameters() if no_decay(name, p)}  # before sharding
        self._wrap()
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), self.device,
                                         no_decay_names=keep)
        if cfg.distill is not None:
            self._setup_distillation()
        return self

    def _build_model(self) -> MambaMoEForCausalLM:
        cfg = self.cfg
        if self.init_dir is not None:
            from safetensors.torch import load_file

            from ..model.lm import CONFIG_NAME, WEIGHTS_NAME, load_state_dict_checked

            mcfg = MambaMoEConfig.load(self.init_dir / CONFIG_NAME)
            if cfg.model.overrides or cfg.model.config:
                self.log(f"model: taken from {self.init_dir}; the config's model section is not used")
        else:
            mcfg = cfg.model.build()
        n_vocab = vocab_size_of(self.tokenizer)
        if mcfg.vocab_size < n_vocab:
            raise ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's {n_vocab} ids")
        if mcfg.max_position_embeddings < cfg.seq_len:
            raise ConfigError(f"seq_len: {cfg.seq_len} exceeds the model's max_position_embeddings "
                              f"({mcfg.max_position_embeddings})")
        model = MambaMoEForCausalLM(mcfg)
        if self.init_dir is not None:
            load_state_dict_checked(model, load_file(str(self.init_dir / WEIGHTS_NAME)), str(self.init_dir))
        model = model.to(self.device)
        model.train()
        if cfg.activation_checkpointing:
            model.set_gradient_checkpointing(True)
        return model

    def _wrap(self) -> None:
        """DDP or FSDP2 under torchrun (``distributed``: ddp | fsdp | auto), optional torch.compile."""
        cfg = self.cfg
        self.forward: Any = self.model
        self.ddp: Any = None
        if self.dist.enabled:
            self.parallel = self._parallel_mode()
            if self.parallel == "fsdp":
                if cfg.qat is not None:
                    raise ConfigError("qat: not supported with distributed=fsdp yet (parametrized weights are not "
                                      "sharded); use distributed=ddp")
                from .fsdp import shard_model

                shard_model(self.model, self.device, bf16=self.amp)
            else:
                from torch.nn.parallel import DistributedDataParallel

                self.ddp = self.forward = DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        mode = "none" if self.device.type != "cuda" else ("blocks" if cfg.compile == "auto" else cfg.compile)
        if mode in ("blocks", "blocks-cudagraphs"):
            # Compiled in place, so DDP / FSDP wrappers and checkpoints see the same modules and names.
            graph_mode = "reduce-overhead" if mode == "blocks-cudagraphs" else None
            for layer in self.model.backbone.layers:
                layer.compile(mode=graph_mode)
        elif mode == "model":
            self.forward = torch.compile(self.forward)
        self.compile_mode = mode

    def _parallel_mode(self) -> str:
        """``auto``: FSDP when one replica's weights + AdamW state (16 bytes/parameter) would take more than
        half of a GPU's memory, DDP otherwise (and always on CPU)."""
        if self.cfg.distributed != "auto":
            return self.cfg.distributed
        if self.device.type != "cuda":
            return "ddp"
        need = 16 * sum(p.numel() for p in self.model.parameters())
        return "fsdp" if need > 0.5 * torch.cuda.get_device_properties(self.device).total_memory else "ddp"

    def _domain_routing_table(self) -> Tensor | None:
        """Data domain index -> preferred expert (-1 = none), from ``domain_routing.experts``."""
        spec = self.cfg.domain_routing
        if spec is None:
            return None
        mcfg = self.model.config
        if "moe" not in mcfg.layer_ffns:
            raise ConfigError("domain_routing: the model has no MoE layer (model layer_ffns has no 'moe')")
        for dom, idx in spec.experts.items():
            if dom not in self.data.domains:
                raise ConfigError(f"domain_routing.experts.{dom}: no such data domain (the data has "
                                  f"{self.data.domains})")
            if idx >= mcfg.moe_num_experts:
                raise ConfigError(f"domain_routing.experts.{dom}: expert {idx} out of range (the model has "
                                  f"{mcfg.moe_num_experts} routed experts)")
        return torch.tensor([spec.experts.get(d, -1) for d in self.data.domains], dtype=torch.long)

    def _setup_distillation(self) -> None:
        from .distill import DistillationError, check_same_vocabulary
        from .distill import load_teacher as load

        def load_teacher(path: str, device: torch.device, dtype: torch.dtype) -> Any:
            try:
                return load(path, device, dtype)
            except DistillationError as err:
                raise ConfigError(f"distill.teacher: {err}") from err

        spec = self.cfg.distill
        dtype = torch.bfloat16 if self.amp else torch.float32
        if spec.topk_dir:
            from .teacher_topk import TeacherTopK, precompute_teacher_topk

            if self.data.token_weighted:
                raise ConfigError("distill.topk_dir: precomputed top-k needs packed data (data.source stdlib or "
                                  "shards), whose windows have ids; for chats, leave topk_dir unset")
            out = Path(spec.topk_dir)
            if not (out / "manifest.json").exists():
                if self.dist.enabled:  # the other ranks would wait on rank 0's whole teacher pass and time out
                    raise ConfigError(f"distill.topk_dir: {out} has no manifest; write it before a distributed "
                                      "run with `mamba-moe distill topk` (or one single-process run)")
                if self.dist.is_main:
                    teacher = load_teacher(spec.teacher, self.device, dtype)
                    self._check_vocab(check_same_vocabulary, teacher)
                    n = len(self.train_ds)
                    self.log(f"distill: precomputing the teacher's top-{spec.topk} for {n:,} windows -> {out}")
                    rows = 64  # teacher inference batch
                    batches = (torch.stack([self._window(i) for i in range(a, min(a + rows, n))]).to(self.device)
                               for a in range(0, n, rows))
                    precompute_teacher_topk(teacher, batches, spec.topk, out,
                                            metadata={"data": str(self.shards), "seq_len": self.cfg.seq_len})
                    del teacher
                barrier(self.dist)
            self.topk = TeacherTopK(out)
            if len(self.topk) != len(self.train_ds):
                raise ConfigError(f"distill.topk_dir: {out} holds {len(self.topk)} windows, the training data "
                                  f"{len(self.train_ds)}; it was computed for other data or seq_len")
            return
        self.teacher = load_teacher(spec.teacher, self.device, dtype)
        self._check_vocab(check_same_vocabulary, self.teacher)

    def _check_vocab(self, check: Callable[[Any, Any], None], teacher: Any) -> None:
        from .distill import DistillationError

        try:
            check(teacher.tokenizer, self.tokenizer)
        except DistillationError as err:
            where = self.cfg.data.tokenizer or (self.init_dir or self.shards or "the data's tokenizer")
            raise ConfigError(f"distill.teacher: {self.cfg.distill.teacher} vs the student tokenizer ({where}): "
                              f"{err}") from err

    def _window(self, window_id: int) -> Tensor:
        stream, k = self.train_ds.locate(window_id)
        return torch.from_numpy(self.train_ds.window(stream, k)[0][:-1])

    # ---- one step -------------------------------------------------------------------------------
    def _forward(self, mb: StepBatch, logits: bool) -> Any:
        kwargs: dict[str, Any] = {"attention_mask": mb.attention_mask}
        if self._expert_table is not None:
            experts = self._expert_table.to(mb.domain_ids.device)[mb.domain_ids]
            kwargs["expert_targets"] = experts[:, None].expand_as(mb.input_ids)
        if mb.document_ids is not None:
            kwargs["document_ids"] = mb.document_ids
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if logits:
                return self.forward(mb.input_ids, **kwargs)
            return self.forward(mb.input_ids, targets=mb.targets, return_logits=False, **kwargs)

    def _loss(self, mb: StepBatch) -> tuple[Tensor, Tensor, dict[str, Tensor], Any]:
        """(main loss, aux, parts, router stats) of one micro-batch. Main loss: the LM cross-entropy over
        the targets, or with ``distill`` alpha * CE + (1 - alpha) * T^2 * KL; aux: the model's router
        losses plus ``domain_routing.coef`` times the mean domain-routing loss over MoE layers."""
        distill = self.teacher is not None or self.topk is not None
        out = self._forward(mb, logits=distill)
        parts: dict[str, Tensor] = {}
        if distill:
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
        if self._expert_table is not None:
            dom = torch.stack([s.domain_loss for s in out.router_stats if s.domain_loss is not None]).mean()
            aux = aux + self.cfg.domain_routing.coef * dom
            parts["domain_loss"] = dom.detach()
        return main, aux, parts, out.router_stats

    def _sync(self, sync: bool) -> Any:
        """Gradient all-reduce only on the last micro-batch (DDP ``no_sync``; FSDP's gradient-sync switch)."""
        if self.parallel == "fsdp":
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if self.parallel == "ddp" and not sync:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        batch = self.data.next().to(self.device)
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, max_steps=cfg.max_steps,
                   schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micros = batch.split(cfg.batch_size)
        weighted = self.data.token_weighted
        if weighted:  # chats: every target token of the global batch weighs the same
            counts = [mb.n_targets() for mb in micros]
            total = max(sum_across_ranks(float(sum(counts)), self.dist, self.device), 1.0)
        # Sums stay on the device (float64, the same arithmetic as Python floats) until every micro-batch is
        # queued: a float() per micro-batch would make the host wait for the GPU before launching the next.
        main_sum = aux_sum = None
        part_sums: dict[str, Tensor] = {}
        loads = []
        for i, micro in enumerate(micros):
            self._new_graph_step()
            with self._sync(i == len(micros) - 1):
                main, aux, parts, stats = self._loss(micro)
                if weighted:
                    w = counts[i] * self.dist.world_size / total
                    (main * w + aux / cfg.grad_accum).backward()
                else:
                    ((main + aux) / cfg.grad_accum).backward()
            # logged: means over the global batch (chats: per target token; windows: per micro-batch)
            scale = counts[i] * self.dist.world_size / total if weighted else 1.0 / cfg.grad_accum
            main_sum = _add(main_sum, main.detach().double() * scale)
            aux_sum = _add(aux_sum, aux.detach().double() / cfg.grad_accum)
            for k, v in parts.items():
                part_sums[k] = _add(part_sums.get(k), v.detach().double()
                                    * (scale if k != "domain_loss" else 1 / cfg.grad_accum))
            # Copied: with CUDA-graph blocks a block's outputs live in graph memory that the next
            # micro-batch's replay overwrites (.float() alone returns the same tensor when it is fp32).
            loads.append([s.tokens_per_expert.detach().float().clone() for s in stats])
        names = list(part_sums)
        loads = [[t.cpu() for t in row] for row in loads]
        means = mean_across_ranks([float(main_sum), float(aux_sum), *(float(v) for v in part_sums.values())],
                                  self.dist, self.device)
        main_mean, aux_mean = means[0], means[1]
        loss = main_mean + aux_mean
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"step": self.step + 1, "loss": loss, "finite": False}
        grad_norm = self._clip()
        if not math.isfinite(grad_norm):  # finite loss, broken gradients: same outcome, no step taken
            self.optimizer.zero_grad(set_to_none=True)
            return {"step": self.step + 1, "loss": grad_norm, "what": "gradient norm", "finite": False}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # lm_loss: the main loss (with distillation alpha * CE + (1 - alpha) * T^2 * KL; its CE is "ce")
        return {"step": self.step, "loss": loss, "lm_loss": main_mean, "aux": aux_mean, "lr": lr,
                "grad_norm": grad_norm, "finite": True, **dict(zip(names, means[2:], strict=True)),
                **_load_summary(loads)}

    def _new_graph_step(self) -> None:
        """With CUDA-graph blocks: the previous forward's outputs are consumed, so the graphs may reuse them."""
        if self.compile_mode == "blocks-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()

    def _clip(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        if self.parallel == "fsdp":
            from .fsdp import to_float

            return to_float(norm)
        return float(norm)

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean LM loss per target token and perplexity over the first ``eval_batches`` validation batches,
        also per domain when the data has several (every rank evaluates the same batches)."""
        self.model.eval()
        per_domain = len(self.data.domains) > 1
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in self.data.val_batches(self.cfg.eval_batches):
            self._new_graph_step()
            mb = batch.to(self.device)
            if per_domain:  # per-row losses, grouped by the row's domain
                logits = self._forward(mb, logits=True).logits
                tok = F.cross_entropy(logits.float().transpose(1, 2), mb.targets, reduction="none",
                                      ignore_index=IGNORE_INDEX)
                valid = mb.targets != IGNORE_INDEX
                rows = zip(tok.sum(1).tolist(), valid.sum(1).tolist(), batch.domain_ids.tolist(), strict=True)
            else:
                n = mb.n_targets()
                rows = [(float(self._forward(mb, logits=False).loss) * n, n, 0)]
            for total, n, dom in rows:
                for key in ("all", self.data.domains[dom]):
                    sums[key] = sums.get(key, 0.0) + total
                    counts[key] = counts.get(key, 0) + n
        self.model.train()
        if not counts.get("all"):
            return {}
        result = {"val_loss": sums["all"] / counts["all"]}
        result["val_ppl"] = math.exp(min(result["val_loss"], 700.0))
        if per_domain:
            result.update({f"val_loss/{k}": sums[k] / counts[k] for k in sums if k != "all" and counts[k]})
        return result

    # ---- checkpoints ------------------------------------------------------------------------------
    def _weights(self) -> dict[str, Tensor] | None:
        """The plain-named state dict to save when ``model.state_dict()`` is not it (FSDP: gathered to
        rank 0, a collective; QAT: the latent float weights)."""
        if self.parallel == "fsdp":
            from .fsdp import full_model_state

            return full_model_state(self.model)
        if self.qat_names:
            from .qat import plain_state_dict

            return plain_state_dict(self.model)
        return None

    def save(self) -> Path:
        path = self.ckpt_root / f"step-{self.step:06d}"
        weights = self._weights()
        if self.parallel == "fsdp":
            from .fsdp import full_optimizer_state

            optimizer = full_optimizer_state(self.model, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        if not self.dist.is_main:  # rank 0 writes; the others wait until the checkpoint is whole
            barrier(self.dist)
            self.last_checkpoint = path
            return path
        state = {"step": self.step, "optimizer": optimizer, "loader": self.data.state_dict(), "rng": rng_state(),
                 "parallel": self.parallel}
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.tokenizer, state,
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.cfg.keep_last,
                               weights=weights)
        self.last_checkpoint = path
        barrier(self.dist)
        return path

    def resume(self) -> Path:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        state = load_state(path)
        saved = state.get("parallel", "none")
        if (saved == "fsdp") != (self.parallel == "fsdp"):
            raise ConfigError(f"--resume: {path} was written by a {saved} run; its optimizer state does not fit a "
                              f"{self.parallel} run (keep distributed= as it was)")
        if self.parallel == "fsdp":
            from .fsdp import load_full_model_state, load_full_optimizer_state

            load_full_model_state(self.model, weights)
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            load_plain_weights(self.model, weights, str(path))
            self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.last_checkpoint = path
        return path

    def save_quantized(self) -> Path:
        """QAT: ``<output>/final-quantized``, the model with the fake quantization applied for good
        (``convert_qat``): plain weights holding the quantized values, loadable by ``from_pretrained``."""
        from ..atomic import atomic_directory
        from .qat import convert_qat, plain_state_dict, prepare_qat

        copy = MambaMoEForCausalLM(self.model.config)
        load_plain_weights(copy, plain_state_dict(self.model), "QAT latent weights")
        prepare_qat(copy, bits=self.cfg.qat.bits, group_size=self.cfg.qat.group_size)
        convert_qat(copy)
        path = self.out / "final-quantized"
        with atomic_directory(path) as tmp:
            write_weights(tmp, copy.config, copy.state_dict())
            self.tokenizer.save_pretrained(str(tmp))
        return path

    def inference_model(self, checkpoint: Path | None = None) -> MambaMoEForCausalLM:
        """A model this process can run alone (for the sample): the live model, or with FSDP the
        checkpoint's weights in a plain model."""
        if self.parallel != "fsdp":
            return self.model
        return MambaMoEForCausalLM.from_pretrained(checkpoint or self.last_checkpoint, device=self.device)

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self, resume: bool = False, until: int | None = None) -> TrainResult:
        """Train to ``max_steps`` (or stop early at step ``until``, saving there). Raises
        :class:`TrainingDiverged` on a non-finite loss, after leaving the last good checkpoint in place."""
        cfg = self.cfg
        self.last_checkpoint = None
        if resume:
            self.log(f"resumed from {self.resume()} at step {self.step}")
        main = self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        if main:
            cfg.save(self.out / "train_config.yaml")
        stop = min(cfg.max_steps, until if until is not None else cfg.max_steps)
        result = TrainResult(step=self.step, shards=self.shards)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * self.dist.world_size
        bar = _progress(cfg, self.step, stop) if main else None
        metrics = MetricsWriter(self.out, main, cfg.tensorboard)
        start, start_step = time.perf_counter(), self.step
        try:
            while self.step < stop:
                t0 = time.perf_counter()
                rec = self.train_step()
                if not rec["finite"]:
                    where = self.last_checkpoint or latest_checkpoint(self.ckpt_root)
                    msg = (f"{rec.get('what', 'loss')} is {rec['loss']} at step {rec['step']}; stopped. "
                           "Last good checkpoint: "
                           + (f"{where} (resume with --resume)" if where else "none written yet"))
                    metrics.write({"step": rec["step"], "event": "diverged", "loss": str(rec["loss"])})
                    raise TrainingDiverged(msg)
                rec["tokens_per_s"] = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                del rec["finite"]
                result.losses.append(rec["loss"])
                if self.step % cfg.eval_every == 0 or self.step == stop:
                    val = self.evaluate()
                    rec.update(val)
                    result.val = val or result.val
                    if val and main:
                        self.log(f"step {self.step}: val loss {val['val_loss']:.4f}  ppl {val['val_ppl']:.2f}")
                metrics.write(rec)
                if bar is not None:
                    bar.update(1)
                    done = self.step - start_step
                    rate = done * tokens_per_step / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rate:.0f}")
                elif main and self.step % cfg.log_every == 0:
                    done = self.step - start_step
                    elapsed = time.perf_counter() - start
                    eta = elapsed / max(done, 1) * (stop - self.step)
                    self.log(f"step {self.step}/{cfg.max_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                             f"{done * tokens_per_step / max(elapsed, 1e-9):.0f} tok/s  eta {eta:.0f}s")
                if self.step % cfg.save_every == 0 or self.step == stop:
                    result.checkpoint = self.save()
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - start
        result.step = self.step
        result.checkpoint = result.checkpoint or self.last_checkpoint or latest_checkpoint(self.ckpt_root)
        result.tokens_per_s = (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
        if self.qat_names and self.step == cfg.max_steps and main:
            result.quantized = self.save_quantized()
        return result


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    """total + value, where None is an empty sum (so the first term is kept exactly: 0.0 + x == x)."""
    return value if total is None else total + value


def _load_summary(loads: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Per-expert load over the step: fraction of routed tokens per expert (mean over layers) and the worst
    layer's max/mean ratio (1.0 = perfectly balanced)."""
    if not loads or not loads[0]:
        return {}
    per_layer = [sum(mb[i] for mb in loads) for i in range(len(loads[0]))]
    fractions = [t / t.sum().clamp(min=1e-9) for t in per_layer]
    mean_frac = torch.stack(fractions).mean(0)
    imbalance = max(float(f.max() / f.mean().clamp(min=1e-9)) for f in fractions)
    return {"expert_load": [round(float(x), 4) for x in mean_frac], "load_max_over_mean": round(imbalance, 4)}


def _progress(cfg: TrainConfig, initial: int, total: int) -> Any:
    """tqdm bar: steps done/total, elapsed<ETA, and loss, lr, tokens/s (mean since start) as postfix."""
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
