"""Held-out metrics of a training method over batches (the loop's eval rounds and ``preftune eval
rewards``): each batch's metrics weighted by its units (scored tokens for SFT, pairs for preference
losses), summed over batches and, when distributed, over ranks, so the means do not depend on how the
rows were split; the accuracy's standard error over all pairs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from preftune.attention import choose_layout
from preftune.config import Config
from preftune.data.collate import LAYOUTS
from preftune.data.tokenize import RowKind, tokenize
from preftune.logprobs import SequenceLogps
from preftune.methods import METHODS
from preftune.reference import ModelReference


@dataclass
class WeightedMeans:
    """Per metric, the sum of ``value x weight`` and of the weights of the batches where it is finite
    (a KTO batch without desirable rows has no ``rewards/chosen``: its NaN is left out, not averaged
    in), plus the pair count ``n``; ``reduced`` sums them over ranks (every rank must call it, with
    the same metric names)."""

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def add(self, metrics: dict, weight: float, n: int) -> None:
        for k, v in metrics.items():
            v = float(v)
            finite = math.isfinite(v)
            self.sums[k] = self.sums.get(k, 0.0) + (v * weight if finite else 0.0)
            self.weights[k] = self.weights.get(k, 0.0) + (weight if finite else 0.0)
        self.n += n

    def reduced(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> WeightedMeans:
        if reduce_sum is None:
            return self
        keys = sorted(self.sums)
        packed = reduce_sum(torch.tensor([self.sums[k] for k in keys] + [self.weights[k] for k in keys] + [self.n],
                                         dtype=torch.float64)).tolist()
        return WeightedMeans(dict(zip(keys, packed)), dict(zip(keys, packed[len(keys):])), int(round(packed[-1])))

    def means(self) -> dict:
        """Weighted means; with ``rewards/accuracies`` (or a reward model's ``accuracy``), its standard error
        over the ``n`` pairs."""
        out = {k: v / self.weights[k] if self.weights[k] else float("nan") for k, v in self.sums.items()}
        for name in ("rewards/accuracies", "accuracy"):
            if name in out and self.n:
                p = out[name]
                out[name + "_se"] = math.sqrt(max(p * (1 - p), 1e-12) / self.n)
        return out | {"n": self.n}


@torch.no_grad()
def evaluate_batches(policy, batches: list[dict], method, stage_cfg, reference, keep: list[bool] | None = None,
                     reduce_sum=None, progress: bool = False, after_batch: Callable[[dict], None] | None = None) -> dict:
    """Metrics of ``method`` over ``batches`` (no gradients), weighted by ``method.units``; a batch
    with ``keep[i]`` False runs (so every rank makes the same forward calls) but weighs nothing.
    ``reduce_sum`` all-reduces the sums across ranks; ``progress`` shows a bar; ``after_batch(batch)``
    runs after each batch's reference and policy passes."""
    acc = WeightedMeans()
    was_training = policy.training
    policy.eval()
    for i, batch in enumerate(tqdm(batches, desc="held-out eval", unit="batch", disable=not progress, leave=False,
                                   dynamic_ncols=True)):
        ref = reference.logps(batch) if reference is not None else None
        loss, metrics = method.step(policy, batch, stage_cfg, ref)
        real = keep is None or keep[i]
        metrics = {k: float(v) for k, v in metrics.items()} | {"loss": float(loss)}
        acc.add(metrics, method.units(batch) if real else 0, batch["num_pairs"] if real else 0)
        if after_batch is not None:
            after_batch(batch)
    policy.train(was_training)
    return acc.reduced(reduce_sum).means()


def reward_inputs(model, tokenizer, reference_model, rows, cfg: Config):
    """``(policy, reference, batches)`` for :func:`evaluate_rewards`: the model as a ``SequenceLogps``,
    its reference strategy (None, ``adapter`` or a frozen copy) and the rows' pair batches in the
    layout training would use, ``eval.batch_size`` pairs each."""
    items = tokenize(rows, tokenizer, cfg.data, RowKind.PREFERENCE).items
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
    return policy, reference, batches


def reward_figures(out: dict) -> dict:
    """The ``rewards/*`` figures, ``loss``, ``n`` and the accuracy's ``se`` of an evaluation's metrics."""
    return {k: out[k] for k in out if k.startswith("rewards/") or k in ("loss", "n")} | {
        "se": out.get("rewards/accuracies_se", float("nan"))
    }


def evaluate_rewards(model, tokenizer, reference_model, rows, cfg: Config) -> dict:
    """``rewards/accuracies`` and margins of ``model`` against ``reference_model`` on preference rows,
    through the training core's own step function (used by ``preftune eval rewards``).

    ``reference_model``: a model, ``"adapter"`` (``model`` with its adapters disabled), or None for
    reference-free losses."""
    policy, reference, batches = reward_inputs(model, tokenizer, reference_model, rows, cfg)
    return reward_figures(evaluate_batches(policy, batches, METHODS["dpo"], cfg.dpo, reference))
