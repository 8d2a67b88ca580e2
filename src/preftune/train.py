"""THE training loop, on accelerate (one process, DDP, FSDP or DeepSpeed via ``accelerate launch``), in
three parts: ``setup`` (data, model, layout, reference, resume -> one ``Stage``), ``train_step`` (one
optimizer step: micro-batches, accumulation, NaN skip, clipping, schedule -> its metrics) and
``finish`` (``final/`` and ``run.json``). ``run_stage`` -> ``train`` drives them, with eval rounds,
early stopping, snapshots and atomic checkpoints in between. What differs between methods is asked of
the method (methods.py); an epoch's batches come from data/stage.py; the run folder's layout from
paths.py."""

from __future__ import annotations

import functools
import json
import logging
import math
import platform
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import accelerate
import datasets
import numpy as np
import peft
import torch
import transformers
from tqdm.auto import tqdm

import preftune
from preftune import checkpoint as ckpt
from preftune import distributed as dist
from preftune import loss_terms
from preftune import preflight as checks
from preftune import reference as refs
from preftune.config import Config, TrainConfig, to_yaml
from preftune.data.stage import (
    StageData,
    dropped_rows,
    epoch_plan,
    load_stage_data,
    stage_bins,
    steps_per_epoch,
    total_steps,
)
from preftune.errors import PreftuneError
from preftune.eval.rewards import WeightedMeans, evaluate_batches
from preftune.logprobs import SequenceLogps
from preftune.methods import METHODS, Method
from preftune.model import is_adapter, load_model, load_tokenizer, slow_bf16, trainable_parameters
from preftune.paths import StageDir
from preftune.resume import check_finished, check_resume, check_writable, trim_metrics
from preftune.reward import (
    RECORD,
    SequenceRewards,
    check_reward_head,
    margins,
    merge_reward_adapter,
    reward_record,
)
from preftune.tracking import open_trackers

log = logging.getLogger("preftune")


# ---------------------------------------------------------------- schedule and early stopping


def warmup_steps(s: TrainConfig, total: int) -> int:
    """Warm-up steps of a stage: ``warmup_steps`` when set, else ``warmup_ratio`` of the total."""
    return s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total)


HF_SCHEDULES = ("constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "polynomial")
"""Schedules computed by transformers' own scheduler functions (``get_scheduler``), as TRL recipes set them."""


@functools.lru_cache(maxsize=16)
def hf_schedule(schedule: str, total: int, warmup: int, kwargs: tuple = (), lr: float = 1.0) -> Callable[[int], float]:
    """transformers' multiplier function for ``schedule`` (``kwargs``: ``lr_scheduler_kwargs`` as sorted
    items; ``lr``: the peak, which polynomial's ``lr_end`` and ``min_lr`` are absolute against): the
    LambdaLR's own lambda, so step ``k`` gets exactly the factor a Trainer uses at step ``k``."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = transformers.get_scheduler(schedule, probe, num_warmup_steps=warmup, num_training_steps=total,
                                           scheduler_specific_kwargs=dict(kwargs))
    return scheduler.lr_lambdas[0]


def lr_at(step: int, total: int, warmup: int, schedule: str, kwargs: dict | None = None, lr: float = 1.0) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up from 0 over
    ``warmup`` steps, then cosine or linear decay to 0 at ``total``, or constant. The HF_SCHEDULES are
    transformers' functions of the step (with ``kwargs``, such as ``min_lr_rate``, and the peak ``lr``)."""
    if schedule in HF_SCHEDULES:
        return hf_schedule(schedule, total, warmup, tuple(sorted((kwargs or {}).items())), lr)(step)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


@dataclass
class EarlyStopping:
    """Stop after ``patience`` eval rounds without an improvement larger than ``min_delta``.

    ``min_delta="auto"`` uses the standard error of the metric reported with it (noise-aware)."""

    mode: str = "max"
    patience: int = 3
    min_delta: float | str = "auto"
    best: float | None = None
    best_step: int | None = None
    bad_rounds: int = 0
    history: list = field(default_factory=list)

    def update(self, value: float, step: int, se: float = 0.0) -> tuple[bool, bool]:
        """Record one eval round; return (improved, should_stop)."""
        self.history.append([step, value])
        delta = se if self.min_delta == "auto" else float(self.min_delta)
        sign = 1 if self.mode == "max" else -1
        improved = self.best is None or sign * (value - self.best) > delta
        if improved:
            self.best, self.best_step, self.bad_rounds = value, step, 0
        else:
            self.bad_rounds += 1
        return improved, self.bad_rounds >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_rounds": self.bad_rounds, "history": self.history}


# ---------------------------------------------------------------- run-folder records


def versions() -> dict:
    return {
        "preftune": preftune.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per log step) plus the configured trackers."""

    def __init__(self, path: Path, cfg: Config, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.trackers = []
        if not enabled:
            return
        if resume_step is not None and path.is_file():  # drop lines written after the checkpoint
            trim_metrics(path, resume_step)
        elif path.exists():
            path.unlink()
        if cfg.report_to:
            self.trackers = open_trackers(cfg.report_to, path.parent, cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for t in self.trackers:
            t.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, record["step"])

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- setup


@dataclass
class TrainState:
    """Where the loop is: what a resume checkpoint's ``state.json`` holds (with early stopping's state)."""

    step: int = 0
    """Optimizer steps taken, skipped (non-finite) ones included."""
    tokens_seen: int = 0
    pairs_seen: int = 0
    nan_streak: int = 0
    """Consecutive steps skipped for a non-finite loss (``nan_tolerance`` stops the run)."""
    skipped_steps: int = 0
    dropped_rows: int = 0
    """Rows ``drop_last`` left out, summed over the epochs counted so far."""
    epochs_counted: int = 0
    """Epochs whose dropped rows are in ``dropped_rows`` (a resumed run does not count one twice)."""

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """The state a checkpoint saved (keys an older preftune did not write take their defaults)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Stage:
    """One training stage between ``setup`` and ``finish``: what it trains, on what, and where it is."""

    name: str
    cfg: Config
    stage_cfg: TrainConfig
    method: Method
    out: StageDir
    model_path: str
    accelerator: Any
    tokenizer: Any
    data: StageData
    model: Any  # the Hugging Face (or peft) model, unwrapped
    policy: Any  # SequenceLogps over it, prepared by accelerate
    optimizer: Any
    params: list
    layout: str
    reference: Any
    ref_strategy: str
    collate: Callable[[list], dict]
    bins: list[list[int]] | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    eval_batches: list[dict]
    eval_keep: list[bool]  # False: a padding batch (a rank with fewer held-out rows runs it, weight 0)
    stopper: EarlyStopping
    metrics_log: MetricsLog | None = None
    state: TrainState = field(default_factory=TrainState)
    resumed_from: int | None = None
    last_eval: dict = field(default_factory=dict)  # the last eval round's figures
    started: float = field(default_factory=time.time)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_step(self) -> int:
        return self.world * self.stage_cfg.grad_accum

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy).model


def build_reference(cfg: Config, stage_cfg: TrainConfig, method: Method, model, policy, data: StageData,
                    collate, model_path: str, tokenizer, accelerator, layout: str = "padded") -> tuple[Any, str]:
    """The reference strategy (reference.py), decided before any update: the model as it came in.
    Precomputed log-probs are computed as the policy's are: on epoch 0's micro-batches (in bf16 a row's
    log-probs move with its batch's shapes) and under the run's autocast."""
    if not method.needs_reference(stage_cfg):
        return refs.NoReference(), "none"
    lora = cfg.lora.enabled or is_adapter(model_path)
    strategy = refs.resolve_strategy(stage_cfg.reference, True, lora, loss_terms.loss_name(stage_cfg))
    disable = getattr(model, "disable_adapter", None) if cfg.lora.enabled else None
    if strategy == "adapter":
        return refs.ModelReference(policy, "adapter", disable), strategy
    if strategy == "copy":
        with dist.whole_weights(accelerator):
            frozen = load_model(cfg, model_path, trainable=False)
        return refs.ModelReference(SequenceLogps(frozen), "copy"), strategy
    plan = epoch_plan(stage_bins(data.train, stage_cfg, layout), len(data.train), stage_cfg.batch_size, cfg.seed, 0)
    bs = stage_cfg.eval_batch_size
    groups = [[data.train[j] for j in idx] for idx in plan] + [data.test[i : i + bs] for i in range(0, len(data.test), bs)]
    batching = None if cfg.precision == "fp32" else [stage_cfg.batch_size, cfg.seed, layout, bs]
    key = refs.cache_key(model_path, tokenizer, cfg.data, cfg.precision, data.fingerprint, batching)

    def compute():
        with accelerator.autocast():
            return refs.precompute(policy, map(collate, groups), disable, progress=accelerator.is_main_process)

    table = refs.load_or_precompute(key, compute, accelerator)
    return table, strategy


def shard(xs: list, rank: int, world: int) -> tuple[list, list[bool]]:
    """Rank ``rank``'s strided share of ``xs``, padded with copies of ``xs[0]`` so that every rank gets
    the same count (and so makes the same collective calls); ``keep`` is False for the padding."""
    mine = xs[rank::world]
    pad = -(-len(xs) // world) - len(mine)
    return mine + [xs[0]] * pad, [True] * len(mine) + [False] * pad


BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}
"""``optimizer`` names that are bitsandbytes' AdamW classes (CUDA only)."""


def check_optimizer(name: str) -> None:
    """Refuse, before any loading, an optimizer this machine cannot run (bitsandbytes' on a CPU)."""
    if name in BNB_OPTIMIZERS and not torch.cuda.is_available():
        raise PreftuneError(f"optimizer {name!r} is bitsandbytes' {BNB_OPTIMIZERS[name]}, which runs on a CUDA GPU "
                            "only; there is none here. Use optimizer adamw (or adamw_fused) on this machine")


def build_optimizer(params: list, s: TrainConfig):
    """AdamW as ``s.optimizer`` names it: torch's (``adamw_fused``: its fused kernel where torch has one
    for the parameters' device, else plain, said in the log) or bitsandbytes' 8-bit or paged AdamW."""
    if s.optimizer in BNB_OPTIMIZERS:
        try:
            import bitsandbytes  # here: an optional, CUDA-only extra
        except ImportError:
            raise PreftuneError(f"optimizer {s.optimizer!r} needs bitsandbytes: pip install bitsandbytes") from None
        return getattr(bitsandbytes.optim, BNB_OPTIMIZERS[s.optimizer])(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw_fused":
        try:
            return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=True)
        except RuntimeError as e:
            log.info("optimizer adamw_fused: torch has no fused AdamW here (%s); using plain AdamW", e)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def setup(cfg: Config, stage: str, out_dir: str | Path, model_path: str, resume: bool = False,
          allow_changes: bool = False, overwrite: bool = False, preflight: bool | None = True) -> Stage:
    """Check the output folder, load data, tokenizer and model, pick the layout and the reference,
    build the optimizer, resume from the newest complete checkpoint when asked (refusing a changed
    config or data unless ``allow_changes``), write the run records (config, versions, data) and run the
    preflight checks (preflight.py). A finished run in ``out_dir`` is refused unless ``resume`` or ``overwrite``."""
    stage_cfg: TrainConfig = getattr(cfg, stage)
    method = METHODS[stage]
    check_optimizer(stage_cfg.optimizer)
    accelerator = dist.make_accelerator(cfg.precision, stage_cfg.grad_accum)
    if accelerator.is_main_process:  # before any data, model or reference work
        check_finished(Path(out_dir), resume, overwrite)
        check_writable(Path(out_dir))
        ckpt.clean_stale(Path(out_dir))
    if cfg.threads:  # run_stage restores the process's count
        torch.set_num_threads(cfg.threads)
    if accelerator.is_main_process and (slow := slow_bf16(cfg.precision)):
        log.warning("%s", slow)
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, cfg.data.chat_template)
    data = load_stage_data(cfg, stage, tokenizer, unpaired=method.unpaired(stage_cfg))
    if resume:
        check_resume(Path(out_dir), cfg, stage, data.fingerprint, allow_changes)
    reward = method.model == "reward"
    with dist.whole_weights(accelerator):
        model = load_model(cfg, model_path, trainable=True, gradient_checkpointing=stage_cfg.gradient_checkpointing,
                           reward=reward)
    if reward:  # transformers' own forward then reads the last real token of a padded row
        check_reward_head(model, f"{stage}: {model_path}")
        model.config.pad_token_id = tokenizer.pad_token_id
    layout = method.layout(stage_cfg, model)
    policy = SequenceRewards(model) if reward else SequenceLogps(model)
    collate = method.collate(stage_cfg, layout, tokenizer.pad_token_id)
    if reward and stage_cfg.margin_column:  # every row's margin checked before any training
        margins(data.train + data.test, stage_cfg.margin_column)
    reference, strategy = build_reference(cfg, stage_cfg, method, model, policy, data, collate, model_path,
                                          tokenizer, accelerator, layout)
    world, rank = accelerator.num_processes, accelerator.process_index
    bins = stage_bins(data.train, stage_cfg, layout)
    per_epoch = steps_per_epoch(len(epoch_plan(bins, len(data.train), stage_cfg.batch_size, cfg.seed, 0)),
                                world * stage_cfg.grad_accum, stage_cfg.drop_last)
    total = total_steps(stage_cfg, per_epoch)
    ebs = stage_cfg.eval_batch_size
    chunks = [data.test[i : i + ebs] for i in range(0, len(data.test), ebs)]
    eval_chunks, eval_keep = shard(chunks, rank, world) if chunks else ([], [])

    policy, optimizer, params = dist.prepare(
        accelerator, policy, lambda ps: build_optimizer(ps, stage_cfg), stage_cfg.batch_size, stage_cfg.max_grad_norm)
    st = Stage(name=stage, cfg=cfg, stage_cfg=stage_cfg, method=method, out=StageDir(out_dir), model_path=model_path,
               accelerator=accelerator, tokenizer=tokenizer, data=data, model=model, policy=policy,
               optimizer=optimizer, params=params, layout=layout, reference=reference, ref_strategy=strategy,
               collate=collate, bins=bins, steps_per_epoch=per_epoch, total_steps=total,
               warmup=warmup_steps(stage_cfg, total), eval_batches=[collate(c) for c in eval_chunks],
               eval_keep=eval_keep,
               stopper=EarlyStopping(stage_cfg.early_stopping_mode, stage_cfg.patience, stage_cfg.min_delta))
    latest = _resume(st, resume)
    _write_records(st, fresh=latest is None)
    st.metrics_log = MetricsLog(st.out.metrics, cfg, st.main, st.state.step if latest else None)
    if latest is None:  # resumed: the policy is no longer its reference; the first run's checks stand
        checks.run(st, preflight)
    if st.main:
        n_train, n_total = trainable_parameters(model)
        log.info("%s: %d train / %d held-out %s, layout=%s, reference=%s, trainable %.2fM of %.1fM params, "
                 "%d steps", stage, len(data.train), len(data.test), "pairs" if method.data == "preference" else "rows",
                 layout, strategy, n_train / 1e6, n_total / 1e6, total)
    return st


def _resume(st: Stage, resume: bool) -> Path | None:
    """Restore the newest complete step checkpoint when ``resume`` (an incomplete newer one is passed
    over, saying so); return it (None: a fresh start)."""
    latest = ckpt.latest_complete(st.out.root) if resume else None
    if resume and latest is None and st.main:
        log.info("resume: no checkpoint in %s; starting this stage from the beginning", st.out.root)
    if latest is None:
        return None
    saved = dist.load_checkpoint(st.accelerator, latest, st.policy, st.optimizer)
    for k, v in saved.pop("early_stopping").items():
        setattr(st.stopper, k, v)
    st.state = TrainState.from_dict(saved)
    st.resumed_from = st.state.step
    log.info("resumed from %s at step %d", latest, st.state.step)
    return latest


def _write_records(st: Stage, fresh: bool) -> None:
    if not st.main:
        return
    st.out.root.mkdir(parents=True, exist_ok=True)
    if fresh:  # snapshots of an earlier run in this folder are stale
        shutil.rmtree(st.out.snapshots_dir, ignore_errors=True)
    st.out.config.write_text(to_yaml(st.cfg))
    st.out.versions.write_text(json.dumps(versions(), indent=1))
    info = {"strategy": st.ref_strategy}
    if getattr(st.reference, "path", None) is not None:
        info |= {"cache": str(st.reference.path), "computed": st.reference.computed}
    st.out.data.write_text(json.dumps({"fingerprint": st.data.fingerprint, **st.data.report, "reference": info},
                                      indent=1))


# ---------------------------------------------------------------- one optimizer step


def _reduce_sum(accelerator):
    return lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()


def step_micro_batches(st: Stage, step: int) -> tuple[list[list[int]], list[bool]]:
    """This rank's micro-batches (item indices) of optimizer step ``step`` and which are real: the
    step's micro-batches strided over ranks; a rank left short (the epoch's last, incomplete step)
    repeats one with weight 0, so every rank runs the same forward and backward calls."""
    epoch, in_epoch = divmod(step, st.steps_per_epoch)
    plan = epoch_plan(st.bins, len(st.data.train), st.stage_cfg.batch_size, st.cfg.seed, epoch)
    if in_epoch == 0:
        _count_dropped(st, plan, epoch)
    return shard(plan[in_epoch * st.per_step : (in_epoch + 1) * st.per_step], st.accelerator.process_index, st.world)


def _count_dropped(st: Stage, plan: list[list[int]], epoch: int) -> None:
    n = dropped_rows(plan, st.per_step, st.stage_cfg.drop_last)
    if n and epoch >= st.state.epochs_counted:
        st.state.dropped_rows += n
        st.state.epochs_counted = epoch + 1
        if st.main:
            log.warning("epoch %d: drop_last leaves out the last incomplete optimizer step: %d of %d rows "
                        "(%d dropped so far)", epoch, n, len(st.data.train), st.state.dropped_rows)


def accumulate(st: Stage, micro: list[list[int]], keep: list[bool]) -> tuple[WeightedMeans, bool, int, int]:
    """Forward and backward of this rank's micro-batches of one optimizer step. Each micro-batch's
    loss (a mean over its units: scored tokens for SFT, pairs for preference losses) is weighted by
    ``units * world / global units``, the step's units summed over micro-batches and all-reduced over
    ranks; DDP's mean over ranks then makes the gradient that of one batch of the whole step, however
    it was split. Returns the unit-weighted metrics, whether every loss was finite, tokens and pairs."""
    acc, method = st.accelerator, st.method
    batches = [st.collate([st.data.train[j] for j in idx]) for idx in micro]
    units = [method.units(b) if real else 0 for b, real in zip(batches, keep)]
    total = float(acc.reduce(torch.tensor(float(sum(units)), device=acc.device), "sum").item()) or 1.0
    means, finite, tokens, pairs = WeightedMeans(), True, 0, 0
    for i, batch in enumerate(batches):
        sync = acc.no_sync(st.policy) if i < len(batches) - 1 and st.world > 1 else nullcontext()
        with sync:
            with acc.autocast():  # the reference too: at step 0 both sides must compute alike
                ref = st.reference.logps(batch)
                loss, metrics = method.step(st.policy, batch, st.stage_cfg, ref)
            # Backward even on NaN so every rank makes the same collective calls; the step is dropped
            # after. accelerate divides by its gradient_accumulation_steps; the weights already sum to 1.
            finite = finite and bool(torch.isfinite(loss))
            acc.backward(loss * (units[i] * st.world / total * acc.gradient_accumulation_steps))
        # a padding batch adds its metric names with weight 0: every rank reduces the same tensor
        means.add({k: float(v) for k, v in metrics.items()} | {"loss": float(loss.detach())}, units[i],
                  batch["num_pairs"] if keep[i] else 0)
        if keep[i]:
            tokens += batch["tokens"]
            pairs += batch["num_pairs"]
    return means, finite, tokens, pairs


def train_step(st: Stage) -> dict | None:
    """One optimizer step: ``accumulate`` this rank's micro-batches, then (if every rank's loss was
    finite) clip and update. Returns the step's metrics record (unit-weighted over the whole step and
    every rank), or None when a non-finite loss on any rank made every rank skip the step."""
    acc, cfg = st.accelerator, st.stage_cfg
    step = st.state.step
    for group in st.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_at(step, st.total_steps, st.warmup, cfg.schedule, cfg.schedule_kwargs, cfg.lr)
    t0 = time.perf_counter()
    means, finite, tokens, pairs = accumulate(st, *step_micro_batches(st, step))
    if acc.reduce(torch.tensor(float(not finite), device=acc.device), "sum").item() > 0:
        _skip_step(st, step)
        return None
    st.state.nan_streak = 0
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    grad_norm = float(acc.clip_grad_norm_(st.params, max_norm))
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    alpha = st.method.reference_sync(cfg, step + 1)
    if alpha is not None:  # TR-DPO
        refs.sync_reference(st.reference, st.unwrapped(), alpha)
    step_time = time.perf_counter() - t0

    record = means.reduced(_reduce_sum(acc)).means()
    record.pop("n")
    record.pop("rewards/accuracies_se", None)
    record.pop("accuracy_se", None)
    tot = acc.reduce(torch.tensor([tokens, pairs], device=acc.device), "sum").tolist()
    st.state.tokens_seen += int(tot[0])
    st.state.pairs_seen += int(tot[1])
    st.state.step += 1
    step = st.state.step
    return {"step": step, "epoch": round(step / st.steps_per_epoch, 4), "tokens_seen": st.state.tokens_seen,
            "pairs_seen": st.state.pairs_seen, "lr": st.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
            **record, "step_time": step_time, "tokens_per_s": tot[0] / max(step_time, 1e-9)}


def _skip_step(st: Stage, step: int) -> None:
    st.optimizer.zero_grad(set_to_none=True)
    st.state.nan_streak += 1
    st.state.skipped_steps += 1
    st.state.step += 1
    log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, st.state.nan_streak)
    if st.state.nan_streak >= st.stage_cfg.nan_tolerance:
        raise PreftuneError(f"{st.state.nan_streak} consecutive steps with a NaN/inf loss at step {step}: "
                            "lower the learning rate, or use fp32 / bf16-mixed instead of bf16")


# ---------------------------------------------------------------- between steps


def evaluate(st: Stage) -> dict:
    """One eval round over the held-out split: each rank's share, reduced, so every rank gets the
    figures one process would (and makes the same forward calls, padding included)."""
    return evaluate_batches(st.policy, st.eval_batches, st.method, st.stage_cfg, st.reference, st.eval_keep,
                            reduce_sum=_reduce_sum(st.accelerator), progress=st.main)


def early_stop(st: Stage, record: dict, step: int) -> bool:
    """Update early stopping from this eval round; keep ``best/``; return whether to stop."""
    metric = st.stage_cfg.early_stopping_metric
    if metric not in record:
        return False
    improved, stop = st.stopper.update(record[metric], step, record.get(metric + "_se", 0.0))
    st.accelerator.wait_for_everyone()
    if improved:  # every rank: a sharded model is gathered first
        dist.save_hf(st.accelerator, st.policy, st.tokenizer, st.out.best,
                     {"best.json": {"best_step": step, "metric": metric, "value": record[metric]}} | model_records(st))
    return st.stage_cfg.early_stopping and stop


def save_between_steps(st: Stage, step: int) -> None:
    """A snapshot model for curves over training (``eval.curve_every``; the last step is ``final/``)
    and a resume checkpoint every ``save_every`` steps."""
    cfg = st.stage_cfg
    curve_every = st.cfg.eval.curve_every if st.method.curves else 0
    if curve_every and step % curve_every == 0 and step < st.total_steps:
        s = st.state
        dist.save_hf(st.accelerator, st.policy, st.tokenizer, st.out.snapshot(step),
                     {"snapshot.json": {"step": s.step, "tokens_seen": s.tokens_seen, "pairs_seen": s.pairs_seen}})
    if cfg.save_every and step % cfg.save_every == 0 and step < st.total_steps:
        st.accelerator.wait_for_everyone()
        dist.save_checkpoint(st.accelerator, st.out.checkpoint(step), st.policy, st.optimizer,
                             asdict(st.state) | {"early_stopping": st.stopper.state()})
        if st.main:
            ckpt.prune(st.out.root, cfg.save_total_limit)


# ---------------------------------------------------------------- finish


def summary(st: Stage, stopped_early: bool) -> dict:
    """The run summary written to ``run.json``."""
    cfg, s = st.cfg, st.stage_cfg
    return {
        "stage": st.name, "method": st.name, **st.method.run_fields(s),
        "steps": st.state.step, "total_steps": st.total_steps, "tokens_seen": st.state.tokens_seen,
        "pairs_seen": st.state.pairs_seen, "skipped_steps": st.state.skipped_steps,
        "dropped_rows": st.state.dropped_rows,
        "best_step": st.stopper.best_step, "best_metric": st.stopper.best, "stopped_early": stopped_early,
        "early_stopping_metric": s.early_stopping_metric, "wall_time_s": round(time.time() - st.started, 2),
        "base_model": st.model_path, "model_revision": cfg.model_revision, "layout": st.layout, "reference": st.ref_strategy, "lora": cfg.lora.enabled,
        "precision": cfg.precision, "train_rows": len(st.data.train), "test_rows": len(st.data.test),
        "data_fingerprint": st.data.fingerprint, "resumed_from": st.resumed_from,
        "distributed": dist.describe(st.accelerator), "preflight": checks.recorded(st.out),
        **({"eval_accuracy": st.last_eval.get("eval/accuracy")} if st.method.model == "reward" else {}),
    }


def model_records(st: Stage) -> dict:
    """JSON files saved beside the model: a reward model's tokenizer digest (reward.RECORD)."""
    return {RECORD: reward_record(st.tokenizer)} if st.method.model == "reward" else {}


def finish(st: Stage, stopped_early: bool) -> dict:
    """Write ``final/`` (a Hugging Face folder) and ``run.json`` on the main process; return the summary."""
    st.accelerator.wait_for_everyone()
    out = summary(st, stopped_early)
    dist.save_hf(st.accelerator, st.policy, st.tokenizer, st.out.final, model_records(st))  # every rank: shards gathered
    if st.main and st.method.model == "reward" and is_adapter(st.out.final):  # a reward model loads as it is
        for folder in (st.out.final, st.out.best):
            if is_adapter(folder):
                merge_reward_adapter(folder)
    if st.main:
        st.out.run.write_text(json.dumps(out, indent=1))
    st.accelerator.wait_for_everyone()
    return out


# ---------------------------------------------------------------- the driver


def run_stage(cfg: Config, stage: str, out_dir: str | Path, model_path: str, resume: bool = False,
              stop_at: int | None = None, allow_changes: bool = False, overwrite: bool = False,
              preflight: bool = True) -> dict:
    """Train one stage (``sft`` or ``dpo``) of ``cfg`` from ``model_path`` into ``out_dir``.

    ``stop_at`` ends the process after that step's checkpoint as a kill would (no final model):
    time-boxed runs and resume tests. ``allow_changes`` lets ``resume`` continue with a changed config
    or data (refused otherwise); ``overwrite`` replaces a finished run in ``out_dir`` (refused otherwise);
    ``preflight=False`` skips the preflight checks. Returns the run summary also written to ``run.json``."""
    if resume and StageDir(out_dir).is_finished():  # nothing left to run: the finished run stays as it is
        log.info("resume: %s finished earlier; nothing to do", out_dir)
        return json.loads(StageDir(out_dir).run.read_text())
    threads = torch.get_num_threads()  # cfg.threads applies to this stage only
    try:
        return train(setup(cfg, stage, out_dir, model_path, resume, allow_changes, overwrite, preflight), stop_at)
    finally:
        torch.set_num_threads(threads)


def train(st: Stage, stop_at: int | None = None) -> dict:
    """Optimizer steps until the total or early stopping, with eval rounds, logging, snapshots and
    checkpoints between them; then ``finish`` (unless ``stop_at`` ended it first)."""
    s = st.stage_cfg
    bar = tqdm(total=st.total_steps, initial=st.state.step, desc=st.name, disable=not st.main, dynamic_ncols=True)
    stopped_early = False
    try:
        st.policy.train()
        while st.state.step < st.total_steps and not stopped_early:
            record = train_step(st)
            bar.update(1)
            if record is None:
                continue
            step = record["step"]
            last = step == st.total_steps
            do_eval = st.eval_batches and ((s.eval_every and step % s.eval_every == 0) or last)
            if do_eval:
                st.last_eval = {f"eval/{k}": v for k, v in evaluate(st).items()}
                record |= st.last_eval
                stopped_early = early_stop(st, record, step)
            if step % s.log_every == 0 or do_eval or last:
                st.metrics_log.write(record)
            bar.set_postfix({k: f"{record[m]:.3g}" for k, m in (("loss", "loss"), ("acc", "rewards/accuracies"), ("acc", "accuracy"),
                                                                  ("tok/s", "tokens_per_s")) if m in record})
            save_between_steps(st, step)
            if stop_at is not None and step >= stop_at:
                return {"stage": st.name, "steps": step, "stopped_at": step, "resumed_from": st.resumed_from}
        return finish(st, stopped_early)
    finally:
        bar.close()
        st.metrics_log.close()
