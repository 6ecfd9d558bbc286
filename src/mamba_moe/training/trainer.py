"""The training loop: batches, accumulation, clipping, the optimizer step, eval, metrics, checkpoints, resume.

One ``Trainer`` per run. ``setup()`` builds everything (so tests can reach in before ``train()``);
``train(resume=True)`` continues from the newest complete checkpoint with bitwise-identical results on CPU.
What the loop does not decide lives beside it: the objective and distillation set-up (``objective.py``),
DDP / FSDP2 / compile / activation checkpointing (``parallelize.py``, one object the loop calls wherever
the strategies differ), checkpoint files (``checkpoint.py``), the output-directory lock (``run_lock.py``),
LoRA adapters (``growth/lora.py``: applied to the --checkpoint base before the optimizer exists, saved in
PEFT's format beside the merged model, restored on resume).

A step whose loss or gradient norm is not finite never reaches ``optimizer.step()``; weights that became
non-finite anyway (an update that overflowed) are never saved. Either way the run stops with
:class:`TrainingDiverged`, naming the last checkpoint written, which is therefore always a finite one.
"""

from __future__ import annotations

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

from ..checkpoint_dirs import CheckpointError, incomplete_reason, step_dirs
from ..config import MambaMoEConfig
from ..data.tokenizer import vocab_size_of
from ..devices import resolve_device
from ..growth.checkpoint import read_history, write_history
from ..growth.lora import is_adapter_dir
from ..model import MambaMoEForCausalLM
from ..ops.cross_entropy import IGNORE_INDEX
from ..validation import ConfigError
from .batches import TrainData
from .checkpoint import (
    latest_checkpoint,
    load_plain_weights,
    load_state,
    load_weights,
    remove_leftovers,
    resolve_init_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_weights,
)
from .config import TrainConfig
from .distributed import (
    DistInfo,
    barrier,
    init_distributed,
    mean_across_ranks,
    sum_across_ranks,
    sum_tensor_across_ranks,
)
from .metrics import MetricsWriter, drop_after
from .objective import build_objective, domain_routing_table
from .optim import build_optimizer, no_decay
from .parallelize import Parallel, parallelize
from .run_lock import OutputInUse, OutputLock
from .schedule import lr_at


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN/inf; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)   # per optimizer step, this invocation
    val: dict[str, float] = field(default_factory=dict)  # last validation: loss, ppl, per domain
    checkpoint: Path | None = None
    shards: Path | None = None
    tokens_per_s: float = 0.0
    quantized: Path | None = None                        # QAT: the converted (quantized-weights) checkpoint
    stopped_early: bool = False                          # the time limit ended this call before max_steps


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self.device = resolve_device(cfg.device)  # a ConfigError naming device: for a missing one
        self.amp = self.device.type == "cuda" and cfg.dtype in ("auto", "bf16")
        self.step = 0
        self.dist = DistInfo()
        self.parallel = "none"       # none | ddp | fsdp (the strategy's name)
        self.last_checkpoint: Path | None = None
        self.lock = OutputLock(self.out)

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Build data, model, parallelism, optimizer and objective; the output directory is locked first
        (a second trainer is refused before it prepares anything) and released again if setup fails."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self._claim_output()
        try:
            return self._setup()
        except BaseException:
            self.lock.release()
            raise

    def _setup(self) -> Trainer:
        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.init_dir = resolve_init_checkpoint(cfg.init_from, log=self.log) if cfg.init_from else None
        self.data = TrainData(cfg, self.dist, self.init_dir, self.log)
        self.tokenizer, self.shards = self.data.tokenizer, self.data.shards
        self.train_ds = self.data.train_ds
        self.model = self._build_model()
        # growth.json of a grown --checkpoint goes into every checkpoint of this run (resume: the resumed one's)
        self.growth_history = read_history(self.init_dir) if self.init_dir is not None else []
        if cfg.lora is not None:
            self._apply_lora()
        self.qat_names: list[str] = []
        if cfg.qat is not None:
            from .qat import prepare_qat

            self.qat_names = prepare_qat(self.model, bits=cfg.qat.bits, group_size=cfg.qat.group_size)
        expert_table = domain_routing_table(cfg, self.model.config, self.data.domains)
        keep = {name for name, p in self.model.named_parameters() if no_decay(name, p)}  # before sharding
        self.plan: Parallel = parallelize(self.model, cfg, self.dist, self.device, self.amp)
        self.parallel = self.plan.name
        if cfg.lora is not None and self.parallel == "fsdp":  # distributed: auto picks FSDP for large models
            raise ConfigError("lora: not supported with FSDP (distributed: auto chose it for this model's size); set "
                              "distributed: ddp")
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), self.device,
                                         no_decay_names=keep)
        self.objective = build_objective(cfg, self.data, self.plan.forward, self.device, self.amp, expert_table,
                                         self.init_dir)
        return self

    def _apply_lora(self) -> None:
        """Adapters on the --checkpoint base, before the optimizer is built: only they require grad, so the
        optimizer holds only them (``param_groups`` skips frozen parameters)."""
        from ..growth.lora import apply_lora

        if self.init_dir is None:
            raise ConfigError("lora: needs the base model to adapt: --checkpoint BASE (or init_from: BASE in the "
                              "config; on --resume give the same base again)")
        apply_lora(self.model, self.cfg.lora, base_path=self.init_dir)
        self.model.to(self.device)

    def _claim_output(self) -> None:
        """Lock the output directory (main rank); every rank learns whether that worked, so a refused
        distributed run stops on all ranks instead of leaving the others waiting in a collective."""
        error: OutputInUse | None = None
        if self.dist.is_main:
            try:
                self.lock.acquire()
            except OutputInUse as err:
                error = err
        if sum_across_ranks(1.0 if error else 0.0, self.dist, self.device):
            raise error or OutputInUse(f"output {self.out}: rank 0 could not lock it (another trainer uses it)")

    def close(self) -> None:
        """Release the output directory (``train()`` does so when it ends)."""
        self.lock.release()

    @property
    def compile_mode(self) -> str:
        return self.plan.compile_mode

    @property
    def teacher(self) -> Any:
        return self.objective.teacher

    @property
    def topk(self) -> Any:
        return self.objective.topk

    def _build_model(self) -> MambaMoEForCausalLM:
        cfg = self.cfg
        if self.init_dir is not None:
            from ..model.lm import CONFIG_NAME, load_state_dict_checked

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
            load_state_dict_checked(model, load_weights(self.init_dir), str(self.init_dir))
        model = model.to(self.device)
        model.train()
        return model

    # ---- one step -------------------------------------------------------------------------------
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
            self.plan.begin_micro_step()
            with self.plan.gradient_sync(i == len(micros) - 1):
                main, aux, parts, stats = self.objective.loss(micro)
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
        loads = _global_loads(loads, self.dist)
        means = mean_across_ranks([float(main_sum), float(aux_sum), *(float(v) for v in part_sums.values())],
                                  self.dist, self.device)
        main_mean, aux_mean = means[0], means[1]
        loss = main_mean + aux_mean
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"step": self.step + 1, "loss": loss, "finite": False}
        grad_norm = self.plan.clip_grad_norm(cfg.grad_clip)
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
            self.plan.begin_micro_step()
            mb = batch.to(self.device)
            if per_domain:  # per-row losses, grouped by the row's domain
                logits = self.objective.forward(mb, logits=True).logits
                tok = F.cross_entropy(logits.float().transpose(1, 2), mb.targets, reduction="none",
                                      ignore_index=IGNORE_INDEX)
                valid = mb.targets != IGNORE_INDEX
                rows = zip(tok.sum(1).tolist(), valid.sum(1).tolist(), batch.domain_ids.tolist(), strict=True)
            else:
                n = mb.n_targets()
                rows = [(float(self.objective.forward(mb, logits=False).loss) * n, n, 0)]
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
    def save(self) -> Path:
        """Write checkpoint ``step`` (rank 0; the others wait until it is whole). The caller has checked the
        weights are finite (``plan.parameters_finite``)."""
        path = self.ckpt_root / f"step-{self.step:06d}"
        weights = self.plan.weights_to_save()                 # collectives under FSDP: every rank calls them
        optimizer = self.plan.optimizer_state(self.optimizer)
        if not self.dist.is_main:
            barrier(self.dist)
            self.last_checkpoint = path
            return path
        state = {"step": self.step, "optimizer": optimizer, "loader": self.data.state_dict(), "rng": rng_state(),
                 "parallel": self.parallel, **self._batch_geometry()}
        if self.cfg.lora is not None:
            # model.safetensors: the adapted model with the adapter folded in, so generate / eval / export read
            # a LoRA run's checkpoint as any other; the adapter itself beside it in PEFT's format.
            from ..growth.lora import merged_copy

            weights = merged_copy(self.model).state_dict()
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.tokenizer, state,
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.cfg.keep_last,
                               weights=weights, extra_files=self._write_side_files)
        self.last_checkpoint = path
        barrier(self.dist)
        return path

    def _write_side_files(self, directory: Path) -> None:
        """What a checkpoint of this run holds beyond the trainer's own files: the LoRA adapter (PEFT's format +
        the base's fingerprint) and the growth history of the model it started from."""
        if self.cfg.lora is not None:
            from ..growth.lora import write_lora_files

            write_lora_files(self.model, directory)
        if self.growth_history:
            write_history(directory, self.growth_history)

    def resume(self) -> Path:
        """Load the newest checkpoint that is complete and readable; damaged newer ones are skipped, saying
        so (a power loss can leave truncated files in a checkpoint that was renamed into place)."""
        candidates = list(reversed(step_dirs(self.ckpt_root)))
        if not candidates:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
        skipped: list[str] = []
        for path in candidates:
            reason = incomplete_reason(path, resume=True)
            if reason is None:
                try:
                    weights, state = load_weights(path), load_state(path)
                except CheckpointError as err:
                    reason = str(err)
            if reason is not None:
                skipped.append(f"{path.name}: {reason}")
                if self.dist.is_main:
                    self.log(f"--resume: skipping {path}: {reason}; falling back to the previous checkpoint")
                continue
            self._note_batch_geometry(state, path)
            if self.cfg.lora is not None:
                # The base came from --checkpoint (restore_lora checks it is the adapter's base); the saved
                # weights are the merged ones, so only the adapter and the optimizer over it are loaded.
                from ..growth.lora import restore_lora

                restore_lora(self.model, path)
                self.optimizer.load_state_dict(state["optimizer"])
            elif is_adapter_dir(path):
                raise ConfigError(f"--resume: {path} is a checkpoint of a LoRA run; keep the config's lora section "
                                  "(and --checkpoint BASE) to resume it")
            else:
                self.plan.load(weights, self.optimizer, state["optimizer"], str(path), state.get("parallel", "none"))
            self.growth_history = read_history(path)
            self.data.load_state_dict(state["loader"])
            set_rng_state(_rng_for_this_machine(state["rng"]))
            self.step = int(state["step"])
            self.last_checkpoint = path
            return path
        raise CheckpointError(f"--resume: no complete checkpoint under {self.ckpt_root} ({'; '.join(skipped)}); "
                              "start the run afresh without --resume")

    def _batch_geometry(self) -> dict[str, int]:
        """What makes a step the same step whatever the number of processes: the rows of one global micro-batch
        and the micro-batches per step (``TrainData.next``), beside the world size that wrote the checkpoint."""
        return {"world_size": self.dist.world_size, "micro_batch_rows": self.cfg.batch_size * self.dist.world_size,
                "grad_accum": self.cfg.grad_accum}

    def _note_batch_geometry(self, state: dict[str, Any], path: Path) -> None:
        """Resuming with another number of processes is allowed (the data position is global); say so, and
        warn when the global batch changed too: the run then continues, but not as the uninterrupted one."""
        if not self.dist.is_main or "world_size" not in state:  # older checkpoints did not record it
            return
        now = self._batch_geometry()
        if state["world_size"] != now["world_size"]:
            self.log(f"--resume: {path} was written by {state['world_size']} process(es); continuing with "
                     f"{now['world_size']}")
        if (state["micro_batch_rows"], state["grad_accum"]) != (now["micro_batch_rows"], now["grad_accum"]):
            self.log(f"--resume: warning: the global batch changed: it was {state['grad_accum']} micro-batch(es) of "
                     f"{state['micro_batch_rows']} rows (world_size x batch_size), now {now['grad_accum']} of "
                     f"{now['micro_batch_rows']}; the data continues where it stopped, but the steps differ from "
                     "the uninterrupted run's (set batch_size to keep world_size x batch_size)")

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
            if self.growth_history:
                write_history(tmp, self.growth_history)
        return path

    def inference_model(self, checkpoint: Path | None = None) -> MambaMoEForCausalLM:
        """A model this process can run alone (for the sample): the live model, or with FSDP the
        checkpoint's weights in a plain model."""
        if self.cfg.lora is not None:  # the checkpoint holds the merged model: the fast decoders read raw weights
            from ..growth.lora import merged_copy

            path = checkpoint or self.last_checkpoint
            return (MambaMoEForCausalLM.from_pretrained(path, device=self.device) if path is not None
                    else merged_copy(self.model))
        return self.plan.standalone_model(checkpoint or self.last_checkpoint)

    # ---- the loop ---------------------------------------------------------------------------------
    def _diverged(self, what: str, value: Any, step: int, metrics: MetricsWriter, saved: str = "") -> None:
        where = self.last_checkpoint or latest_checkpoint(self.ckpt_root)
        metrics.write({"step": step, "event": "diverged", "what": what, "loss": str(value)})
        raise TrainingDiverged(f"{what} is {value} at step {step}; stopped{saved}. Last good checkpoint: "
                               + (f"{where} (resume with --resume)" if where else "none written yet"))

    def train(self, resume: bool = False, until: int | None = None,
              time_limit_s: float | None = None) -> TrainResult:
        """Train to ``max_steps`` (or stop early at step ``until``, saving there). With ``time_limit_s``,
        stop at the first step that ends after that many seconds of this call and save there too
        (``result.stopped_early``), so a run in time-boxed slices continues with ``resume=True``. Raises
        :class:`TrainingDiverged` on a non-finite loss, gradient or weight, after leaving the last good
        checkpoint in place. Holds the output directory's lock until it returns."""
        if time_limit_s is not None and not time_limit_s > 0:
            raise ConfigError(f"time limit: must be > 0 seconds, got {time_limit_s}")
        try:
            self._claim_output()
            return self._train(resume, until, time_limit_s)
        finally:
            self.lock.release()

    def _train(self, resume: bool, until: int | None, time_limit_s: float | None = None) -> TrainResult:
        cfg = self.cfg
        self.last_checkpoint = None
        main = self.dist.is_main
        if main:  # under the lock: temporaries here are from a killed run, never from a live one
            for leftover in remove_leftovers(self.ckpt_root):
                self.log(f"removed {leftover.name}, left by an interrupted save")
        if resume:
            self.log(f"resumed from {self.resume()} at step {self.step}")
        self.out.mkdir(parents=True, exist_ok=True)
        if main:
            cfg.save(self.out / "train_config.yaml")
            if dropped := drop_after(self.out, self.step):
                self.log(f"metrics.jsonl: dropped {dropped} record(s) after step {self.step} (written by an earlier "
                         "or interrupted run of this output)")
        stop = min(cfg.max_steps, until if until is not None else cfg.max_steps)
        result = TrainResult(step=self.step, shards=self.shards)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * self.dist.world_size
        bar = _progress(cfg, self.step, stop) if main else None
        metrics = MetricsWriter(self.out, main, cfg.tensorboard)
        start, start_step = time.perf_counter(), self.step
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.step < stop:
                t0 = time.perf_counter()
                rec = self.train_step()
                if not rec["finite"]:
                    self._diverged(rec.get("what", "loss"), rec["loss"], rec["step"], metrics)
                rec["tokens_per_s"] = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                if cuda:  # the study's memory column; reset at the start of each call of train()
                    rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                del rec["finite"]
                # Every rank takes the same decision (rank 0's clock), or a rank would wait in a collective.
                out_of_time = time_limit_s is not None and _agree(
                    time.perf_counter() - start >= time_limit_s, self.dist, self.device)
                if out_of_time and self.step < stop:
                    stop = self.step
                    result.stopped_early = True
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
                    # An update can overflow with finite loss and gradients (a huge lr): such weights are
                    # never written, so every checkpoint on disk is one a run can continue from.
                    if not self.plan.parameters_finite():
                        self._diverged("a weight", "not finite", self.step, metrics, saved=" without saving")
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


def _agree(flag: bool, dist: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is true on any (one rank's slow clock cannot leave the others waiting)."""
    return sum_across_ranks(float(flag), dist, device) > 0 if dist.enabled else flag


def _rng_for_this_machine(rng: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's RNG state with its CUDA part cut to the GPUs this process sees: rank 0 saved one state per
    GPU of its machine, and resumed on fewer (another world size), ``torch.cuda.set_rng_state_all`` would fail
    on the first device ordinal missing here."""
    if "cuda" in rng and torch.cuda.is_available():
        return {**rng, "cuda": list(rng["cuda"])[:torch.cuda.device_count()]}
    return rng


def _global_loads(loads: list[list[Tensor]], dist: DistInfo) -> list[list[Tensor]]:
    """Tokens per expert of each micro-batch and MoE layer, summed over the ranks (on the CPU, for logging)."""
    if not dist.enabled or not loads or not loads[0]:
        return [[t.cpu() for t in row] for row in loads]
    total = sum_tensor_across_ranks(torch.stack([torch.stack(row) for row in loads]), dist).cpu()
    return [list(row.unbind(0)) for row in total.unbind(0)]


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
