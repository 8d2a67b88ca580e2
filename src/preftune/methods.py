"""Training methods as small step functions plus a table: ``METHODS["sft"]``, ``METHODS["dpo"]``
(every loss of ``losses.LOSSES``, alone or as a weighted sum, on pairs or on unpaired KTO rows) and ``METHODS["rm"]`` (a reward model). A
step turns one batch (the contract in data/rows.py) into ``(loss, metrics)``; the loop, optimizer and
reference strategy live elsewhere (train.py, reference.py). LD-DPO's length-desensitised sums and
WPO's weights are computed here, from the log-probs, for every loss alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from preftune import loss_terms
from preftune.attention import choose_layout
from preftune.config import DPOConfig, RMConfig, SFTConfig
from preftune.data import collate as collation
from preftune.errors import PreftuneError
from preftune.logprobs import SequenceLogps
from preftune.losses import LOSSES, PairLogps, kto_reference_point, sft_nll
from preftune.reward import bradley_terry_loss, rewards_of, with_margins

Metrics = dict[str, Any]
StepFn = Callable[[SequenceLogps, dict, Any, "dict[str, Tensor] | None"], tuple[Tensor, Metrics]]
Collate = Callable[[list], dict]


def pairs_of(batch: dict) -> int:
    """Units of a preference batch: its pairs (the loss is a mean over pairs)."""
    return int(batch["num_pairs"])


def scored_tokens_of(batch: dict) -> int:
    """Units of an SFT batch: its scored tokens (the loss is a mean over tokens)."""
    return int(batch["score_index"].numel())


def preference_layout(cfg, model) -> str:
    """The configured layout (``cfg.layout``, ``auto`` resolved for ``model``; attention.py)."""
    return choose_layout(cfg.layout, model)


def preference_collate(cfg, layout: str, pad_id: int) -> Collate:
    """Pairs in ``layout``, or unpaired (KTO) rows in the same pair layouts plus their labels. Shared
    layouts carry ``blocks``/``segments``, from which the model side builds its mask (attention.py)."""
    if loss_terms.unpaired(cfg):
        return lambda items: collation.collate_unpaired(items, pad_id, collation.LAYOUTS[layout])
    return lambda items: collation.LAYOUTS[layout](items, pad_id)


def no_reference_sync(cfg, step: int) -> float | None:
    return None


def no_loss_fields(cfg) -> dict:
    """``run.json`` of a method without a loss of the table (SFT): no ``loss``, no ``beta``."""
    return {"loss": None, "beta": None}


def tr_dpo_sync(cfg: DPOConfig, step: int) -> float | None:
    """TR-DPO (``dpo.sync_ref_model``): the mixing weight alpha every ``ref_model_sync_steps`` steps."""
    return cfg.ref_model_mixup_alpha if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0 else None


@dataclass(frozen=True)
class Method:
    """A training method: everything the loop (train.py) asks of one, so the loop never asks which
    method or config it runs. Metrics are batch means (0-d tensors) over the batch's ``units`` (pairs,
    or scored tokens for SFT): the loop weights each micro-batch's loss and metrics by its units over
    the whole optimizer step and all ranks. ``cfg`` is the stage's config section (``cfg.sft``, ``cfg.dpo``)."""

    step: StepFn
    """``step(policy, batch, cfg, reference_logps) -> (loss, metrics)``: one micro-batch."""
    needs_reference: Callable[[Any], bool]
    """``needs_reference(cfg)``: whether ``step`` needs reference log-probs (reference.py builds them)."""
    run_fields: Callable[[Any], dict] = no_loss_fields
    """``run_fields(cfg)``: the method's fields of ``run.json`` (``loss``, ``beta``, and ``method``
    when it is not the stage's name)."""
    units: Callable[[dict], int] = pairs_of
    """``units(batch)``: what the batch's loss is a mean over."""
    data: str = "preference"
    """The row kind it trains on (``preference`` or ``sft``)."""
    model: str = "causal_lm"
    """What it trains: ``causal_lm`` (log-probs, logprobs.SequenceLogps) or ``reward`` (a one-label
    sequence classifier, reward.SequenceRewards)."""
    unpaired: Callable[[Any], bool] = lambda cfg: False
    """``unpaired(cfg)``: whether it reads its preference data as unpaired rows (KTO's; data/unpaired.py)."""
    layout: Callable[[Any, Any], str] = preference_layout
    """``layout(cfg, model)``: the batch layout (data/collate.py's ``LAYOUTS``)."""
    collate: Callable[[Any, str, int], Collate] = preference_collate
    """``collate(cfg, layout, pad_id)``: the stage's collate function, items -> one batch."""
    reference_sync: Callable[[Any, int], float | None] = no_reference_sync
    """``reference_sync(cfg, step)``: after optimizer step ``step`` (1-based), the weight with which
    the policy is mixed into the reference (TR-DPO), or None for no sync."""
    curves: bool = True
    """Whether the loop saves ``snapshots/step-N`` for curves over training (``eval.curve_every``)."""


def sequence_logps_of(
    policy: SequenceLogps, batch: dict, chunked: bool = True, score_seq: Tensor | None = None,
    num_seqs: int | None = None, sum_sq_probs: bool = False,
) -> tuple[Tensor, ...]:
    """Run ``policy`` on the model inputs of a batch-contract dict -> ``(sums, counts, means)``, each ``[S]``
    (``score_seq``/``num_seqs`` replace the batch's to sum other segments; ``sum_sq_probs`` adds WPO's sums)."""
    return policy(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        score_index=batch["score_index"],
        score_target=batch["score_target"],
        score_seq=batch["score_seq"] if score_seq is None else score_seq,
        num_seqs=batch["num_seqs"] if num_seqs is None else num_seqs,
        chunked=chunked,
        blocks=batch.get("blocks"),
        segments=batch.get("segments"),
        **({"sum_sq_probs": True} if sum_sq_probs else {}),
    )


def tail_segments(batch: dict) -> tuple[Tensor, int]:
    """Segments for LD-DPO: a scored token of sequence ``s`` goes to segment ``s`` while it lies within
    the pair's shorter completion, to ``S + s`` beyond it -> ``(score_seq [N], 2S)``. Tokens of a
    sequence are scored in order (every layout), so a token's rank in its sequence is its position."""
    seq, s, b = batch["score_seq"], batch["num_seqs"], batch["num_pairs"]
    counts = torch.bincount(seq, minlength=s)
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)
    order = torch.argsort(seq, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seq)
    rank[order] = torch.arange(seq.numel(), device=seq.device) - starts[seq[order]]
    return seq + s * (rank >= shared[seq]).long(), 2 * s


def _split_sums(sums: Tensor, counts: Tensor, s: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over ``2S`` tail segments -> ``(plain sums [S], tail sums [S], counts [S])``."""
    return sums[:s] + sums[s:], sums[s:], counts[:s] + counts[s:]


def reference_logps_of(policy: SequenceLogps, batch: dict, chunked: bool = True) -> dict[str, Tensor]:
    """Reference log-probs of a preference batch, without gradients: ``chosen``/``rejected`` sums,
    ``chosen_mean``/``rejected_mean`` and ``chosen_tail``/``rejected_tail`` (the sums beyond the pair's
    shorter completion, for LD-DPO), each ``[B]``. The caller picks the model (a frozen copy, or the
    policy inside ``with model.disable_adapter():``)."""
    seq, n = tail_segments(batch)
    with torch.no_grad():
        sums, counts, _ = sequence_logps_of(policy, batch, chunked, seq, n)
    plain, tail, counts = _split_sums(sums.detach(), counts, batch["num_seqs"])
    ref = PairLogps.from_sequences(plain, counts, batch["num_pairs"])
    b = batch["num_pairs"]
    return {
        "chosen": ref.chosen,
        "rejected": ref.rejected,
        "chosen_mean": ref.chosen_mean,
        "rejected_mean": ref.rejected_mean,
        "chosen_tail": tail[:b],
        "rejected_tail": tail[b:],
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
    loss: Tensor, policy: PairLogps, chosen_rewards: Tensor, rejected_rewards: Tensor
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


def unpaired_metrics(
    loss: Tensor, policy: PairLogps, chosen_rewards: Tensor, rejected_rewards: Tensor, kl: Tensor
) -> dict[str, Tensor]:
    """TRL KTO's metrics: ``rewards/chosen`` and ``logps/chosen`` over the desirable rows,
    ``*/rejected`` over the undesirable ones (NaN when the batch has none), ``rewards/margins`` the
    difference of the two means and ``kl`` the reference point. No accuracy: rows are not paired."""
    labels = policy.labels
    logps = policy.chosen.detach()
    chosen, rejected = chosen_rewards.mean(), rejected_rewards.mean()
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": logps[labels].mean(),
        "logps/rejected": logps[~labels].mean(),
        "kl": kl,
    }


def dpo_needs_reference(cfg: DPOConfig) -> bool:
    return loss_terms.needs_reference(cfg)


def dpo_run_fields(cfg: DPOConfig) -> dict:
    """A preference stage is named by its loss in ``run.json`` (``method``, ``loss``) with its beta."""
    name = loss_terms.loss_name(cfg)
    return {"method": name, "loss": name, "beta": loss_terms.loss_beta(cfg)}


def policy_logps(policy: SequenceLogps, batch: dict, cfg: DPOConfig) -> tuple[PairLogps, Tensor | None]:
    """The policy's per-sequence log-probs of a batch (LD-DPO sums under ``cfg.ld_alpha``) and WPO's
    per-pair weights ``[B]`` under ``cfg.wpo``: ``w = exp(mean_t (log p_t - log sum_v p_v^2))`` of the
    chosen times that of the rejected completion, without gradient (Zhou et al. 2024, eq. 2; as TRL 1.16)."""
    seq, n = tail_segments(batch)
    out = sequence_logps_of(policy, batch, cfg.chunked_logps, seq, n, sum_sq_probs=cfg.wpo)
    plain, tail, counts = _split_sums(out[0], out[1], batch["num_seqs"])
    labels = batch.get("labels")
    pol = PairLogps.from_sequences(plain, counts, batch["num_pairs"], labels)
    if cfg.ld_alpha is not None:
        b = batch["num_pairs"]
        ld = plain - (1 - cfg.ld_alpha) * tail
        pol = pol._replace(chosen=ld[:b], rejected=ld[b:])
    weights = None
    if cfg.wpo:
        sq = out[3][: batch["num_seqs"]] + out[3][batch["num_seqs"] :]
        w = torch.exp((plain.detach() - sq) / counts.clamp(min=1))
        weights = w[: batch["num_pairs"]] * w[batch["num_pairs"] :]
    return pol, weights


def reference_pair_logps(reference_logps: dict[str, Tensor], policy: PairLogps, cfg: DPOConfig) -> PairLogps:
    """The reference's PairLogps for this batch, with LD-DPO's sums under ``cfg.ld_alpha``."""
    ref = PairLogps.from_reference(reference_logps, policy)
    if cfg.ld_alpha is None:
        return ref
    if "chosen_tail" not in reference_logps:
        raise PreftuneError("dpo.ld_alpha needs the reference's tail sums, which this reference cache lacks; "
                            "delete the cache (~/.cache/preftune/reference) to recompute it")
    a = 1 - cfg.ld_alpha
    return ref._replace(chosen=ref.chosen - a * reference_logps["chosen_tail"].to(ref.chosen),
                        rejected=ref.rejected - a * reference_logps["rejected_tail"].to(ref.rejected))


def dpo_step(
    policy: SequenceLogps, batch: dict, cfg: DPOConfig, reference_logps: dict[str, Tensor] | None
) -> tuple[Tensor, Metrics]:
    """One concatenated forward over chosen (seqs ``0..B-1``) and rejected (``B..2B-1``; for unpaired
    rows: each row's completion, then its mismatched KL completion), then ``sum_k weight_k *
    mean(losses_k)`` over the ``dpo.loss`` terms (TRL's ``loss_type`` list with ``loss_weights``),
    each pair's loss times its WPO weight under ``dpo.wpo``. ``rewards/*`` come from the first term
    that is not ``sft``; ``loss/<name>`` is logged per term when there are several, ``nll_loss`` for ``sft``."""
    terms = loss_terms.terms(cfg)
    specs = [LOSSES[t.name] for t in terms]
    pol, weights = policy_logps(policy, batch, cfg)
    ref = None
    if any(s.needs_reference for s in specs) and reference_logps:
        ref = reference_pair_logps(reference_logps, pol, cfg)
    loss = torch.zeros((), dtype=pol.chosen.dtype, device=pol.chosen.device)
    metrics: Metrics = {}
    rewards = None
    for term, spec in zip(terms, specs):
        losses, chosen_rewards, rejected_rewards = spec.fn(pol, ref if spec.needs_reference else None, term.params)
        if weights is not None:
            losses = losses * weights
        value = losses.mean()
        loss = loss + term.weight * value
        if term.name == "sft":
            metrics["nll_loss"] = value.detach()
        elif len(terms) > 1:
            metrics[f"loss/{term.name}"] = value.detach()
        if rewards is None and (term.name != "sft" or term is terms[-1]):
            rewards = chosen_rewards, rejected_rewards
    if pol.labels is not None:
        kl = (kto_reference_point(pol.rejected, ref.rejected) if ref is not None and "kto" in [t.name for t in terms]
              else torch.zeros((), device=loss.device))
        metrics.update(unpaired_metrics(loss, pol, *rewards, kl))
    else:
        metrics.update(preference_metrics(loss, pol, *rewards))
    return loss, metrics


def sft_collate(cfg: SFTConfig, layout: str, pad_id: int) -> Collate:
    """SFT rows, padded; the prompt masked unless ``sft.completion_only`` is false."""
    return lambda items: collation.collate_sft(items, pad_id, completion_only=cfg.completion_only)


def rm_step(policy, batch: dict, cfg: RMConfig, reference_logps: dict | None = None) -> tuple[Tensor, Metrics]:
    """Bradley-Terry loss of a reward model (``policy``: reward.SequenceRewards) on a preference batch,
    with the batch's ``margin`` ``[B]`` when the data has one and ``rm.center_rewards_coefficient``.

    Metrics under TRL RewardTrainer's names: ``loss``, ``accuracy`` (r_c > r_r), ``margin`` (mean r_c - r_r),
    ``min_reward``/``mean_reward``/``max_reward`` over chosen and rejected, ``rewards/chosen``/``rewards/rejected``."""
    rewards = rewards_of(policy, batch)
    b = batch["num_pairs"]
    losses, chosen, rejected = bradley_terry_loss(rewards[:b], rewards[b:], batch.get("margin"),
                                                  cfg.center_rewards_coefficient)
    loss = losses.mean()
    every, c, r = rewards.detach(), chosen.detach(), rejected.detach()
    return loss, {"loss": loss.detach(), "accuracy": (c > r).float().mean(), "margin": (c - r).mean(),
                  "min_reward": every.min(), "mean_reward": every.mean(), "max_reward": every.max(),
                  "rewards/chosen": c.mean(), "rewards/rejected": r.mean()}


def rm_collate(cfg: RMConfig, layout: str, pad_id: int) -> Collate:
    """Pairs in ``layout``, with each pair's ``margin`` when ``rm.margin_column`` is set."""
    return lambda items: with_margins(collation.LAYOUTS[layout](items, pad_id), items, cfg.margin_column)


METHODS: dict[str, Method] = {
    "sft": Method(step=sft_step, needs_reference=lambda cfg: False, units=scored_tokens_of, data="sft",
                  layout=lambda cfg, model: "padded", collate=sft_collate, curves=False),
    "dpo": Method(step=dpo_step, needs_reference=dpo_needs_reference, run_fields=dpo_run_fields,
                  unpaired=loss_terms.unpaired, reference_sync=tr_dpo_sync),
    "rm": Method(step=rm_step, needs_reference=lambda cfg: False, model="reward", collate=rm_collate, curves=False),
}
"""Method name -> Method. ``dpo`` covers every loss of ``losses.LOSSES`` through ``dpo.loss``; ``rm`` trains a
reward model (reward.py) with the Bradley-Terry loss."""
