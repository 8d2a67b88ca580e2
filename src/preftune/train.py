"""THE training loop, on accelerate (one process, DDP, FSDP or DeepSpeed via ``accelerate launch``):
data -> micro-batches -> method step -> accumulation, clipping, schedule -> metrics, eval, early
stopping, atomic checkpoints and exact resume. Methods are step functions in methods.py."""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from preftune import checkpoint as ckpt
from preftune import distributed as dist
from preftune.config import Config, DPOConfig, TrainConfig, to_yaml
from preftune.data.rows import fingerprint
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")


# ---------------------------------------------------------------- schedule and early stopping


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up from 0 over
    ``warmup`` steps, then cosine or linear decay to 0 at ``total``, or constant."""
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


# ---------------------------------------------------------------- data


@dataclass
class StageData:
    train: list
    test: list
    report: dict
    fingerprint: str


def load_stage_data(cfg: Config, stage: str, tokenizer) -> StageData:
    from preftune.data.formats import sft_rows_from_pairs
    from preftune.data.sources import load_rows
    from preftune.data.tokenize import tokenize_rows

    data_cfg = cfg.data
    if stage == "sft" and cfg.sft.data is not None:
        data_cfg = cfg.sft.data
        train_rows, test_rows, read = load_rows(data_cfg, "sft", cfg.seed)
    else:
        train_rows, test_rows, read = load_rows(data_cfg, "preference", cfg.seed)
        if stage == "sft":
            train_rows, test_rows = sft_rows_from_pairs(train_rows), sft_rows_from_pairs(test_rows)
    kind = "sft" if stage == "sft" else "preference"
    train, tok_train = tokenize_rows(train_rows, tokenizer, data_cfg, kind)
    test, tok_test = tokenize_rows(test_rows, tokenizer, data_cfg, kind)
    if not train:
        raise PreftuneError(f"no training rows left from {data_cfg.source} after filtering: {tok_train.to_dict()}")
    report = {"read": read.to_dict(), "tokenize_train": tok_train.to_dict(), "tokenize_test": tok_test.to_dict()}
    return StageData(train, test, report, fingerprint([t.key for t in train] + ["|"] + [t.key for t in test]))


def plan_epoch(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of item indices for one epoch: a seeded shuffle, cut into ``batch_size`` chunks."""
    order = list(range(n_items))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def packed_bins(items: list, token_budget: int) -> list[list[int]]:
    """Item indices grouped into micro-batches of at most ``token_budget`` prefix-shared tokens
    (first-fit decreasing: the same bins every epoch; only their order is shuffled)."""
    from preftune.data.collate import pack_into_batches

    index = {id(it): i for i, it in enumerate(items)}
    return [[index[id(it)] for it in b] for b in pack_into_batches(items, token_budget)]


def epoch_plan(bins: list[list[int]] | None, n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's micro-batches: seeded batches of ``batch_size``, or the packed bins in a seeded order."""
    if bins is None:
        return plan_epoch(n_items, batch_size, seed, epoch)
    order = list(range(len(bins)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [bins[i] for i in order]


def collate_for(stage_cfg: TrainConfig, layout: str, pad_id: int, completion_only: bool = True,
                attention: str | None = None):
    """The stage's collate function. Under flex_attention the shared layouts leave out the dense
    ``[R, 1, T, T]`` mask: the model builds a BlockMask from ``blocks`` and ``segments`` on its device."""
    from preftune.data import collate

    if not isinstance(stage_cfg, DPOConfig):
        return lambda items: collate.collate_sft(items, pad_id, completion_only=completion_only)
    if layout != "padded" and attention == "flex_attention":
        return lambda items: collate.LAYOUTS[layout](items, pad_id, dense_mask=False)
    return lambda items: collate.LAYOUTS[layout](items, pad_id)


# ---------------------------------------------------------------- evaluation


def mean_metrics(parts: list[tuple[dict, int]]) -> dict:
    """Weighted mean of metric dicts (weight = pairs or tokens of each batch)."""
    total = sum(w for _, w in parts) or 1
    keys = parts[0][0].keys() if parts else []
    return {k: sum(float(m[k]) * w for m, w in parts) / total for k in keys}


@torch.no_grad()
def evaluate_batches(policy, batches, method, stage_cfg, reference) -> dict:
    """Mean metrics of ``method`` over ``batches`` (no gradients); adds the accuracy's standard error."""
    parts = []
    was_training = policy.training
    policy.eval()
    for batch in batches:
        ref = reference.logps(batch) if reference is not None else None
        loss, metrics = method.step(policy, batch, stage_cfg, ref)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["loss"] = float(loss)
        parts.append((metrics, batch["num_pairs"]))
    policy.train(was_training)
    out = mean_metrics(parts)
    n = sum(w for _, w in parts)
    if "rewards/accuracies" in out and n:
        p = out["rewards/accuracies"]
        out["rewards/accuracies_se"] = math.sqrt(max(p * (1 - p), 1e-12) / n)
    out["n"] = n
    return out


def reduce_eval(ev: dict, accelerator) -> dict:
    """Pair-weighted mean of per-rank eval metrics; the accuracy's standard error over all pairs."""
    keys = [k for k in ev if k not in ("n", "rewards/accuracies_se")]
    n = ev["n"]
    packed = torch.tensor([ev[k] * n for k in keys] + [n], dtype=torch.float64, device=accelerator.device)
    packed = accelerator.reduce(packed, "sum").tolist()
    total = packed[-1] or 1
    out = {k: v / total for k, v in zip(keys, packed)} | {"n": int(packed[-1])}
    if "rewards/accuracies" in out:
        p = out["rewards/accuracies"]
        out["rewards/accuracies_se"] = math.sqrt(max(p * (1 - p), 1e-12) / total)
    return out


def evaluate_rewards(model, tokenizer, reference_model, rows, cfg: Config) -> dict:
    """``rewards/accuracies`` and margins of ``model`` against ``reference_model`` on preference rows,
    through the training core's own step function (used by ``preftune eval rewards``).

    ``reference_model``: a model, ``"adapter"`` (``model`` with its adapters disabled), or None for
    reference-free losses."""
    from preftune.data.collate import LAYOUTS, choose_layout
    from preftune.data.tokenize import tokenize_rows
    from preftune.logprobs import SequenceLogps
    from preftune.methods import METHODS
    from preftune.reference import ModelReference

    items, _ = tokenize_rows(rows, tokenizer, cfg.data, "preference")
    layout = choose_layout(cfg.dpo.layout, model)
    policy = SequenceLogps(model)
    if reference_model is None:
        reference = None
    elif reference_model == "adapter":
        reference = ModelReference(policy, "adapter", model.disable_adapter)
    else:
        reference = ModelReference(SequenceLogps(reference_model), "copy")
    bs = cfg.eval.batch_size
    batches = [LAYOUTS[layout](items[i : i + bs], tokenizer.pad_token_id) for i in range(0, len(items), bs)]
    out = evaluate_batches(policy, batches, METHODS["dpo"], cfg.dpo, reference)
    return {k: out[k] for k in out if k.startswith("rewards/") or k in ("loss", "n")} | {
        "se": out.get("rewards/accuracies_se", float("nan"))
    }


# ---------------------------------------------------------------- run folder


def versions() -> dict:
    import accelerate
    import datasets
    import peft
    import transformers

    import preftune

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
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif path.exists():
            path.unlink()
        if cfg.report_to:
            from preftune.tracking import open_trackers

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


# ---------------------------------------------------------------- the loop


def run_stage(cfg: Config, stage: str, out_dir: str | Path, model_path: str, resume: bool = False,
              stop_at: int | None = None) -> dict:
    """Train one stage (``sft`` or ``dpo``) of ``cfg`` from ``model_path`` into ``out_dir``.

    ``stop_at`` ends the process after that step's checkpoint as a kill would (no final model):
    time-boxed runs and resume tests. Returns the run summary also written to ``run.json``."""
    from tqdm.auto import tqdm

    from preftune import reference as refs
    from preftune.data.collate import choose_layout
    from preftune.logprobs import SequenceLogps
    from preftune.methods import METHODS
    from preftune.model import is_adapter, load_model, load_tokenizer, trainable_parameters

    started = time.time()
    out = Path(out_dir)
    stage_cfg: TrainConfig = cfg.sft if stage == "sft" else cfg.dpo
    method = METHODS["sft" if stage == "sft" else "dpo"]
    accelerator = dist.make_accelerator(cfg.precision, stage_cfg.grad_accum)
    main = accelerator.is_main_process
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(model_path)
    data = load_stage_data(cfg, stage, tokenizer)
    with dist.whole_weights(accelerator):
        model = load_model(cfg, model_path, trainable=True, gradient_checkpointing=stage_cfg.gradient_checkpointing)
    n_train, n_total = trainable_parameters(model)
    layout = choose_layout(cfg.dpo.layout, model) if stage == "dpo" else "padded"
    policy = SequenceLogps(model)
    collate = collate_for(stage_cfg, layout, tokenizer.pad_token_id, getattr(stage_cfg, "completion_only", True),
                          getattr(model.config, "_attn_implementation", None))

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * stage_cfg.grad_accum
    bins = packed_bins(data.train, cfg.dpo.token_budget) if layout == "packed" else None
    steps_per_epoch = max(1, len(epoch_plan(bins, len(data.train), stage_cfg.batch_size, cfg.seed, 0)) // per_step)
    total_steps = stage_cfg.max_steps or max(1, int(stage_cfg.epochs * steps_per_epoch))
    warmup = int(stage_cfg.warmup_ratio * total_steps)
    eval_batches = [collate(data.test[i : i + stage_cfg.eval_batch_size])
                    for i in range(rank * stage_cfg.eval_batch_size, len(data.test), world * stage_cfg.eval_batch_size)]

    # Reference: decided before any update, so it is the model as it came in.
    reference = None
    ref_strategy = "none"
    if stage == "dpo":
        ref_strategy = refs.resolve_strategy(cfg.dpo.reference, method.needs_reference(cfg.dpo),
                                             cfg.lora.enabled or is_adapter(model_path), cfg.dpo.loss)
        disable = getattr(model, "disable_adapter", None) if cfg.lora.enabled else None
        if ref_strategy == "adapter":
            reference = refs.ModelReference(policy, "adapter", disable)
        elif ref_strategy == "copy":
            with dist.whole_weights(accelerator):
                frozen = load_model(cfg, model_path, trainable=False)
            reference = refs.ModelReference(SequenceLogps(frozen), "copy")
        elif ref_strategy == "precomputed":
            all_items = data.train + data.test
            bs = stage_cfg.eval_batch_size
            key = refs.cache_key(model_path, tokenizer, cfg.data, cfg.precision, data.fingerprint)
            reference = refs.load_or_precompute(
                key, lambda: refs.precompute(policy, [collate(all_items[i : i + bs]) for i in range(0, len(all_items), bs)],
                                             disable, progress=main),
                accelerator,
            )
        else:
            reference = refs.NoReference()

    policy, optimizer, params = dist.prepare(
        accelerator, policy, lambda ps: torch.optim.AdamW(ps, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay),
        stage_cfg.batch_size, stage_cfg.max_grad_norm)

    stopper = EarlyStopping(stage_cfg.early_stopping_mode, stage_cfg.patience, stage_cfg.min_delta)
    state = {"step": 0, "tokens_seen": 0, "pairs_seen": 0, "nan_streak": 0, "skipped_steps": 0}
    latest = ckpt.step_checkpoints(out)[-1] if resume and ckpt.step_checkpoints(out) else None
    if resume and latest is None and main:
        log.info("resume: no checkpoint in %s; starting this stage from the beginning", out)
    resumed_from = None
    if latest is not None:
        state = dist.load_checkpoint(accelerator, latest, policy, optimizer)
        for k, v in state.pop("early_stopping").items():
            setattr(stopper, k, v)
        resumed_from = state["step"]
        log.info("resumed from %s at step %d", latest, state["step"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if latest is None:  # a fresh start: snapshots of an earlier run in this folder are stale
            shutil.rmtree(out / "snapshots", ignore_errors=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        (out / "versions.json").write_text(json.dumps(versions(), indent=1))
        (out / "data.json").write_text(json.dumps({"fingerprint": data.fingerprint, **data.report,
                                                    "reference": _ref_info(reference, ref_strategy)}, indent=1))
    metrics_log = MetricsLog(out / "metrics.jsonl", cfg, main, state["step"] if latest else None)
    if main:
        log.info("%s: %d train / %d held-out %s, layout=%s, reference=%s, trainable %.2fM of %.1fM params, "
                 "%d steps", stage, len(data.train), len(data.test), "pairs" if stage == "dpo" else "rows",
                 layout, ref_strategy, n_train / 1e6, n_total / 1e6, total_steps)

    curve_every = cfg.eval.curve_every if stage == "dpo" else 0
    policy.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=stage, disable=not main, dynamic_ncols=True)
    stopped_early = False
    while state["step"] < total_steps and not stopped_early:
        step = state["step"]
        epoch, in_epoch = divmod(step, steps_per_epoch)
        plan = epoch_plan(bins, len(data.train), stage_cfg.batch_size, cfg.seed, epoch)
        micro = plan[in_epoch * per_step : (in_epoch + 1) * per_step][rank::world]
        for group in optimizer.param_groups:
            group["lr"] = stage_cfg.lr * lr_at(step, total_steps, warmup, stage_cfg.schedule)
        t0 = time.perf_counter()
        parts, finite, tokens, pairs = [], True, 0, 0
        for i, idx in enumerate(micro):
            batch = collate([data.train[j] for j in idx])
            ref = reference.logps(batch) if reference is not None else None
            sync = accelerator.no_sync(policy) if i < len(micro) - 1 and world > 1 else nullcontext()
            with sync, accelerator.autocast():
                loss, metrics = method.step(policy, batch, stage_cfg, ref)
            # Backward even on NaN so every rank makes the same collective calls; the step is dropped below.
            finite = finite and bool(torch.isfinite(loss))
            accelerator.backward(loss / len(micro))
            parts.append(({k: float(v) for k, v in metrics.items()} | {"loss": float(loss.detach())}, batch["num_pairs"]))
            tokens += batch["tokens"]
            pairs += batch["num_pairs"]
        finite = accelerator.reduce(torch.tensor(float(not finite), device=accelerator.device), "sum").item() == 0
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            state["nan_streak"] += 1
            state["skipped_steps"] += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, state["nan_streak"])
            if state["nan_streak"] >= stage_cfg.nan_tolerance:
                raise PreftuneError(f"{state['nan_streak']} consecutive steps with a NaN/inf loss at step {step}: "
                                    "lower the learning rate, or use fp32 / bf16-mixed instead of bf16")
            state["step"] += 1
            bar.update(1)
            continue
        state["nan_streak"] = 0
        max_norm = stage_cfg.max_grad_norm if stage_cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0

        record = mean_metrics(parts)
        record = {k: float(v) for k, v in zip(record, accelerator.reduce(
            torch.tensor(list(record.values()), device=accelerator.device), "mean").tolist())}
        tot = accelerator.reduce(torch.tensor([tokens, pairs], device=accelerator.device), "sum").tolist()
        state["tokens_seen"] += int(tot[0])
        state["pairs_seen"] += int(tot[1])
        state["step"] += 1
        step = state["step"]
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "tokens_seen": state["tokens_seen"],
                  "pairs_seen": state["pairs_seen"], "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                  **record, "step_time": step_time, "tokens_per_s": tot[0] / max(step_time, 1e-9)}

        do_eval = eval_batches and ((stage_cfg.eval_every and step % stage_cfg.eval_every == 0) or step == total_steps)
        if do_eval:
            ev = reduce_eval(evaluate_batches(policy, eval_batches, method, stage_cfg, reference), accelerator)
            record |= {f"eval/{k}": v for k, v in ev.items()}
            stopped_early = _early_stop(stopper, stage_cfg, record, step, accelerator, policy, tokenizer, out, main)
        if step % stage_cfg.log_every == 0 or do_eval or step == total_steps:
            metrics_log.write(record)
        bar.update(1)
        bar.set_postfix({k: f"{record[m]:.3g}" for k, m in (("loss", "loss"), ("acc", "rewards/accuracies"),
                                                              ("tok/s", "tokens_per_s")) if m in record})
        if curve_every and step % curve_every == 0 and step < total_steps:
            # a model folder for the curves over training (the final step is final/)
            dist.save_hf(accelerator, policy, tokenizer, out / "snapshots" / f"step-{step}",
                         {"snapshot.json": {k: state[k] for k in ("step", "tokens_seen", "pairs_seen")}})
        if stage_cfg.save_every and step % stage_cfg.save_every == 0 and step < total_steps:
            accelerator.wait_for_everyone()
            dist.save_checkpoint(accelerator, out / "checkpoints" / f"step-{step}", policy, optimizer,
                                 state | {"early_stopping": stopper.state()})
            if main:
                ckpt.prune(out, stage_cfg.save_total_limit)
        if stop_at is not None and step >= stop_at:
            bar.close()
            metrics_log.close()
            return {"stage": stage, "steps": step, "stopped_at": step, "resumed_from": resumed_from}
    bar.close()
    metrics_log.close()

    accelerator.wait_for_everyone()
    summary = {
        "stage": stage, "method": "sft" if stage == "sft" else cfg.dpo.loss,
        "loss": None if stage == "sft" else cfg.dpo.loss, "beta": None if stage == "sft" else cfg.dpo.beta,
        "steps": state["step"], "total_steps": total_steps, "tokens_seen": state["tokens_seen"],
        "pairs_seen": state["pairs_seen"], "skipped_steps": state["skipped_steps"],
        "best_step": stopper.best_step, "best_metric": stopper.best, "stopped_early": stopped_early,
        "early_stopping_metric": _es_metric(stage_cfg), "wall_time_s": round(time.time() - started, 2),
        "base_model": model_path, "layout": layout, "reference": ref_strategy, "lora": cfg.lora.enabled,
        "precision": cfg.precision, "train_rows": len(data.train), "test_rows": len(data.test),
        "data_fingerprint": data.fingerprint, "resumed_from": resumed_from,
        "distributed": dist.describe(accelerator),
    }
    dist.save_hf(accelerator, policy, tokenizer, out / "final")
    if main:
        (out / "run.json").write_text(json.dumps(summary, indent=1))
        from preftune.card import update_card

        update_card(out)  # final/ and best/ both get a card (refreshed with eval figures later)
    accelerator.wait_for_everyone()
    return summary


def _early_stop(stopper, stage_cfg, record, step, accelerator, policy, tokenizer, out, main) -> bool:
    """Update early stopping from this eval round; keep ``best/``; return whether to stop."""
    metric = _es_metric(stage_cfg)
    if metric not in record:
        return False
    se = record.get(metric + "_se", 0.0)
    improved, stop = stopper.update(record[metric], step, se)
    accelerator.wait_for_everyone()
    if improved:
        summary = {"best_step": step, "metric": metric, "value": record[metric]}
        dist.save_hf(accelerator, policy, tokenizer, out / "best", {"best.json": summary})
    return stage_cfg.early_stopping and stop


def _es_metric(stage_cfg: TrainConfig) -> str:
    return stage_cfg.early_stopping_metric


def _ref_info(reference, strategy: str) -> dict:
    info = {"strategy": strategy}
    if getattr(reference, "path", None) is not None:
        info |= {"cache": str(reference.path), "computed": reference.computed}
    return info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
