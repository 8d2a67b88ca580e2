"""A training stage's data: its rows read and tokenized (train and held-out), and each epoch cut into
micro-batches of item indices (seeded batches, or packed bins), with THE steps-per-epoch rule that
the loop and the sweep's estimates share. Collation lives in collate.py; the loop in train.py."""

from __future__ import annotations

import random
from dataclasses import dataclass

from preftune.config import Config, DataConfig, DPOConfig, TrainConfig
from preftune.data.collate import pack_into_batches
from preftune.data.formats import sft_rows_from_pairs
from preftune.data.prepare import tokenize_splits
from preftune.data.rows import fingerprint
from preftune.data.sources import load_rows
from preftune.data.unpaired import load_unpaired, tokenize_unpaired
from preftune.errors import PreftuneError


@dataclass
class StageData:
    train: list
    test: list
    report: dict
    fingerprint: str


def stage_data_config(cfg: Config, stage: str) -> DataConfig:
    """The data section a stage reads: ``sft.data`` for SFT when set, else ``data``."""
    return cfg.sft.data if stage == "sft" and cfg.sft.data is not None else cfg.data


def load_stage_data(cfg: Config, stage: str, tokenizer, unpaired: bool = False) -> StageData:
    """Train and held-out items of ``stage``: SFT reads ``sft.data`` when set, else the chosen
    responses of the preference data; a preference stage reads ``data`` as pairs, or as unpaired rows
    when ``unpaired`` (the losses read them, as KTO's: pairs split with ``dpo.unpair``)."""
    data_cfg = stage_data_config(cfg, stage)
    if unpaired:
        train_rows, test_rows, read = load_unpaired(data_cfg, cfg.dpo.unpair, cfg.seed)
        (train, tok_train), (test, tok_test) = (tokenize_unpaired(r, tokenizer, data_cfg) for r in (train_rows, test_rows))
        # split pairs do not fit the read = kept + dropped account, so the unpaired report keeps its parts
        report = {"read": read.to_dict(), "tokenize_train": tok_train.to_dict(), "tokenize_test": tok_test.to_dict()}
        why = tok_train.to_dict()
    else:
        kind = "sft" if stage == "sft" else "preference"
        train_rows, test_rows, read = load_rows(data_cfg, "sft" if data_cfg is not cfg.data else "preference", cfg.seed)
        if stage == "sft" and data_cfg is cfg.data:
            train_rows, test_rows = sft_rows_from_pairs(train_rows), sft_rows_from_pairs(test_rows)
        train, test, report = tokenize_splits(train_rows, test_rows, read, tokenizer, data_cfg, kind)
        why = report["drops"]
    if not train:
        raise PreftuneError(f"no training rows left from {data_cfg.source} after filtering: {why}")
    return StageData(train, test, report, fingerprint([t.key for t in train] + ["|"] + [t.key for t in test]))


def plan_epoch(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of item indices for one epoch: a seeded shuffle, cut into ``batch_size`` chunks."""
    order = list(range(n_items))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def packed_bins(items: list, token_budget: int) -> list[list[int]]:
    """Item indices grouped into micro-batches of at most ``token_budget`` prefix-shared tokens
    (first-fit decreasing: the same bins every epoch; only their order is shuffled)."""
    index = {id(it): i for i, it in enumerate(items)}
    return [[index[id(it)] for it in b] for b in pack_into_batches(items, token_budget)]


def epoch_plan(bins: list[list[int]] | None, n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's micro-batches: seeded batches of ``batch_size``, or the packed bins in a seeded order."""
    if bins is None:
        return plan_epoch(n_items, batch_size, seed, epoch)
    order = list(range(len(bins)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [bins[i] for i in order]


def stage_bins(items: list, stage_cfg: TrainConfig, layout: str) -> list[list[int]] | None:
    """The packed layout's bins (fixed for the whole stage), or None for batches of ``batch_size``."""
    return packed_bins(items, stage_cfg.token_budget) if layout == "packed" and isinstance(stage_cfg, DPOConfig) else None


def steps_per_epoch(n_micro: int, per_step: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of ``n_micro`` micro-batches, ``per_step`` (world x grad_accum) a
    step: the last incomplete step is kept unless ``drop_last``. At least 1."""
    full, rest = divmod(n_micro, per_step)
    return max(1, full + (1 if rest and not drop_last else 0))


def total_steps(stage_cfg: TrainConfig, per_epoch: int) -> int:
    """``max_steps`` when set, else ``epochs`` times the steps of one epoch (at least 1)."""
    return stage_cfg.max_steps or max(1, int(stage_cfg.epochs * per_epoch))


def dropped_rows(plan: list[list[int]], per_step: int, drop_last: bool) -> int:
    """Rows of an epoch that ``drop_last`` leaves out (the last incomplete optimizer step's)."""
    rest = len(plan) % per_step
    return sum(len(b) for b in plan[len(plan) - rest :]) if drop_last and rest and len(plan) > per_step else 0

