"""The training loop: data, model, AdamW, schedule, accumulation, clipping, eval, checkpoints, exact resume.

One ``Trainer`` per run. ``setup()`` builds everything (so tests can reach in before ``train()``);
``train(resume=True)`` continues from the newest checkpoint with bitwise-identical results on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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

from ..config import ConfigError
from ..data import PackedDataset, PackedLoader, load_tokenizer, prepare_stdlib, stdlib_tokenizer
from ..data.shards import load_manifest
from ..data.tokenizer import default_cache_dir, vocab_size_of
from ..model import MambaMoEForCausalLM
from .checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import DistInfo, barrier, init_distributed, mean_across_ranks
from .optim import build_optimizer
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
        self.tokenizer, self.shards = self._data()
        self.train_ds = PackedDataset(self.shards, cfg.seq_len, "train", tokenizer=self.tokenizer)
        self.loader = PackedLoader(self.train_ds, cfg.batch_size * cfg.grad_accum, rank=self.dist.rank,
                                   world_size=self.dist.world_size, seed=cfg.seed)
        try:
            self.val_ds: PackedDataset | None = PackedDataset(self.shards, cfg.seq_len, "val",
                                                              expected_hash=self.train_ds.manifest["tokenizer"]["hash"])
        except ValueError as err:
            self.log(f"no validation windows ({err}); validation skipped")
            self.val_ds = None
        mcfg = cfg.model.build()
        n_vocab = vocab_size_of(self.tokenizer)
        if mcfg.vocab_size < n_vocab:
            raise ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's {n_vocab} ids")
        if mcfg.max_position_embeddings < cfg.seq_len:
            raise ConfigError(f"seq_len: {cfg.seq_len} exceeds the model's max_position_embeddings "
                              f"({mcfg.max_position_embeddings})")
        self.model = MambaMoEForCausalLM(mcfg).to(self.device)
        self.model.train()
        self.forward: Any = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = self.forward
        if cfg.compile and self.device.type == "cuda":
            self.forward = torch.compile(self.forward)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), self.device)
        return self

    def _data(self) -> tuple[Any, Path]:
        d = self.cfg.data
        if d.source == "shards":
            shards = Path(d.path)
            tok_path = d.tokenizer or load_manifest(shards)["tokenizer"]["path"]
            return load_tokenizer(tok_path), shards
        if not self.dist.is_main:  # rank 0 trains the tokenizer and writes the shards; the others reuse them
            barrier(self.dist)
        tok = stdlib_tokenizer(vocab_size=d.vocab_size)
        cap = f"-n{d.max_docs}" if d.max_docs else ""
        shards = Path(d.path) if d.path else default_cache_dir() / "shards" / f"stdlib-v{d.vocab_size}{cap}"
        prepare_stdlib(tok.name_or_path, shards, val_fraction=d.val_fraction, max_docs=d.max_docs,
                       workers=1 if d.max_docs else 0)
        if self.dist.is_main:
            barrier(self.dist)
        return tok, shards

    # ---- one step -------------------------------------------------------------------------------
    def _loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(input_ids)
        lm = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1))
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=lm.device)
        return lm, aux.float(), out.router_stats

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        batch = next(self.loader)
        tokens = batch.tokens.to(self.device)
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, max_steps=cfg.max_steps,
                   schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lm_sum = aux_sum = 0.0
        loads = []
        micros = tokens.split(cfg.batch_size)
        for i, micro in enumerate(micros):
            # DDP: all-reduce gradients once, on the last micro-batch
            sync = i == len(micros) - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                lm, aux, stats = self._loss(micro[:, :-1], micro[:, 1:])
                ((lm + aux) / cfg.grad_accum).backward()
            lm_sum += float(lm.detach())
            aux_sum += float(aux.detach())
            loads.append([s.tokens_per_expert.detach().float().cpu() for s in stats])
        lm_mean, aux_mean = mean_across_ranks([lm_sum / cfg.grad_accum, aux_sum / cfg.grad_accum], self.dist,
                                              self.device)
        loss = lm_mean + aux_mean
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"step": self.step + 1, "loss": loss, "finite": False}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf")))
        if not math.isfinite(grad_norm):  # finite loss, broken gradients: same outcome, no step taken
            self.optimizer.zero_grad(set_to_none=True)
            return {"step": self.step + 1, "loss": grad_norm, "what": "gradient norm", "finite": False}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss, "lm_loss": lm_mean, "aux": aux_mean, "lr": lr,
                "grad_norm": grad_norm, "finite": True, **_load_summary(loads)}

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean LM loss and perplexity over the first ``eval_batches`` validation batches, also per domain."""
        if self.val_ds is None:
            return {}
        self.model.eval()
        loader = PackedLoader(self.val_ds, self.cfg.batch_size, shuffle=False, loop=False)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for i, batch in enumerate(loader):
            if i >= self.cfg.eval_batches:
                break
            tokens = batch.tokens.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.forward(tokens[:, :-1]).logits
            per_row = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
            for row, dom in zip(per_row.tolist(), batch.domain_ids.tolist(), strict=True):
                for key in ("all", loader.domains[dom]):
                    sums[key] = sums.get(key, 0.0) + row
                    counts[key] = counts.get(key, 0) + 1
        self.model.train()
        if not counts:
            return {}
        result = {"val_loss": sums["all"] / counts["all"]}
        result["val_ppl"] = math.exp(result["val_loss"])
        if len(counts) > 2:  # more than one domain
            result.update({f"val_loss/{k}": sums[k] / counts[k] for k in sums if k != "all"})
        return result

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        path = self.ckpt_root / f"step-{self.step:06d}"
        if not self.dist.is_main:  # rank 0 writes; the others wait until the checkpoint is whole
            barrier(self.dist)
            self.last_checkpoint = path
            return path
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                 "rng": rng_state()}
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.tokenizer, state,
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.cfg.keep_last)
        self.last_checkpoint = path
        barrier(self.dist)
        return path

    def resume(self) -> Path:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
        from safetensors.torch import load_file

        from ..model.lm import load_state_dict_checked

        load_state_dict_checked(self.model, load_file(str(path / "model.safetensors")), str(path))
        state = load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.last_checkpoint = path
        return path

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self, resume: bool = False, until: int | None = None) -> TrainResult:
        """Train to ``max_steps`` (or stop early at step ``until``, saving there). Raises
        :class:`TrainingDiverged` on a non-finite loss, after leaving the last good checkpoint in place."""
        cfg = self.cfg
        self.last_checkpoint: Path | None = None
        if resume:
            self.log(f"resumed from {self.resume()} at step {self.step}")
        main = self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        if main:
            cfg.save(self.out / "train_config.yaml")
        stop = min(cfg.max_steps, until if until is not None else cfg.max_steps)
        result = TrainResult(step=self.step, shards=self.shards)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        bar = _progress(cfg, self.step, stop) if main else None
        metrics = (self.out / "metrics.jsonl").open("a") if main else open(os.devnull, "w")  # noqa: SIM115
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
                    metrics.write(json.dumps({"step": rec["step"], "event": "diverged", "loss": str(rec["loss"])})
                                  + "\n")
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
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                elif main and self.step % cfg.log_every == 0:
                    self.log(f"step {self.step}/{cfg.max_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                             f"{rec['tokens_per_s']:.0f} tok/s")
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
        return result


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
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
