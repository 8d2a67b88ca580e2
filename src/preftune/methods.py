"""Training methods as small step functions plus a table: ``METHODS["sft"]`` and ``METHODS["dpo"]``
(every loss in ``losses.LOSSES``: sigmoid, ipo, hinge, robust, simpo, orpo). A step turns one batch
(the contract in data/rows.py) into ``(loss, metrics)``; the loop, optimizer and reference strategy
live elsewhere (train.py, reference.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from preftune.config import DPOConfig, SFTConfig
from preftune.logprobs import SequenceLogps
from preftune.losses import REFERENCE_FREE, SeqLogps, get_loss, sft_nll

Metrics = dict[str, Any]
StepFn = Callable[[SequenceLogps, dict, Any, "dict[str, Tensor] | None"], tuple[Tensor, Metrics]]


def pairs_of(batch: dict) -> int:
    """Units of a preference batch: its pairs (the loss is a mean over pairs)."""
    return int(batch["num_pairs"])


def scored_tokens_of(batch: dict) -> int:
    """Units of an SFT batch: its scored tokens (the loss is a mean over tokens)."""
    return int(batch["score_index"].numel())


@dataclass(frozen=True)
class Method:
    """A training method: ``step(policy, batch, cfg, reference_logps) -> (loss, metrics)`` and whether
    it needs reference log-probs for ``cfg``. Metrics are batch means (0-d tensors) over the batch's
    ``units`` (pairs, or scored tokens for SFT): the loop weights each micro-batch's loss and metrics
    by its units over the whole optimizer step and all ranks. ``data`` is the row kind it trains on
    (``preference`` or ``sft``); preference methods choose a batch layout, SFT is always padded."""

    step: StepFn
    needs_reference: Callable[[Any], bool]
    units: Callable[[dict], int] = pairs_of
    data: str = "preference"


def sequence_logps_of(
    policy: SequenceLogps, batch: dict, chunked: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``policy`` on the model inputs of a batch-contract dict -> ``(sums, counts, means)``, each ``[S]``."""
    return policy(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        score_index=batch["score_index"],
        score_target=batch["score_target"],
        score_seq=batch["score_seq"],
        num_seqs=batch["num_seqs"],
        chunked=chunked,
        blocks=batch.get("blocks"),
        segments=batch.get("segments"),
    )


def reference_logps_of(policy: SequenceLogps, batch: dict, chunked: bool = True) -> dict[str, Tensor]:
    """Reference log-probs of a preference batch, without gradients: ``chosen``/``rejected`` sums and
    ``chosen_mean``/``rejected_mean``, each ``[B]``. The caller picks the model (a frozen copy, or the
    policy inside ``with model.disable_adapter():``)."""
    with torch.no_grad():
        sums, counts, _ = sequence_logps_of(policy, batch, chunked)
    ref = SeqLogps.from_sequences(sums.detach(), counts, batch["num_pairs"])
    return {
        "chosen": ref.chosen,
        "rejected": ref.rejected,
        "chosen_mean": ref.chosen_mean,
        "rejected_mean": ref.rejected_mean,
    }


# ------------------------------------------------------------------ SFT


def sft_step(
    policy: SequenceLogps, batch: dict, cfg: SFTConfig, reference_logps: dict | None = None
) -> tuple[Tensor, Metrics]:
    """Token-mean NLL over the batch's scored (completion, or all with ``completion_only=false``) tokens.

    Metrics: ``loss`` and ``logps/mean`` (the batch mean of each sequence's per-token mean log-prob)."""
    sums, counts, means = sequence_logps_of(policy, batch, cfg.chunked_logps)
    loss = sft_nll(sums, counts)
    return loss, {"loss": loss.detach(), "logps/mean": means.detach().mean()}


# ------------------------------------------------------------------ DPO family


def preference_metrics(
    loss: Tensor, policy: SeqLogps, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> dict[str, Tensor]:
    """TRL's metric names, batch means. ``logps/*`` are summed completion log-probs (TRL's DPO
    convention for every loss); ``logps/*_mean`` the per-token means beside them."""
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
        "logps/chosen_mean": policy.chosen_mean.detach().mean(),
        "logps/rejected_mean": policy.rejected_mean.detach().mean(),
    }


def dpo_needs_reference(cfg: DPOConfig) -> bool:
    return cfg.loss not in REFERENCE_FREE


def dpo_step(
    policy: SequenceLogps, batch: dict, cfg: DPOConfig, reference_logps: dict[str, Tensor] | None
) -> tuple[Tensor, Metrics]:
    """One concatenated forward over chosen (seqs ``0..B-1``) and rejected (``B..2B-1``), the
    ``cfg.loss`` entry of ``LOSSES`` averaged over pairs, plus ``cfg.sft_weight`` times the chosen
    token-mean NLL (RPO; TRL's ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, w]``)."""
    loss_fn = get_loss(cfg.loss)
    sums, counts, _ = sequence_logps_of(policy, batch, cfg.chunked_logps)
    pol = SeqLogps.from_sequences(sums, counts, batch["num_pairs"])
    ref = (
        SeqLogps.from_reference(reference_logps, pol)
        if dpo_needs_reference(cfg) and reference_logps
        else None
    )
    losses, chosen_rewards, rejected_rewards = loss_fn(pol, ref, cfg)
    loss = losses.mean()
    metrics: Metrics = {}
    if cfg.sft_weight:
        nll = sft_nll(pol.chosen, pol.chosen_count)
        loss = loss + cfg.sft_weight * nll
        metrics["nll_loss"] = nll.detach()
    metrics.update(preference_metrics(loss, pol, chosen_rewards, rejected_rewards))
    return loss, metrics


METHODS: dict[str, Method] = {
    "sft": Method(step=sft_step, needs_reference=lambda cfg: False, units=scored_tokens_of, data="sft"),
    "dpo": Method(step=dpo_step, needs_reference=dpo_needs_reference),
}
"""Method name -> Method. ``dpo`` covers ORPO and SimPO through ``dpo.loss``."""
