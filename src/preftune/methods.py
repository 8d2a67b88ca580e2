"""Training methods as small step functions plus a table: ``METHODS["sft"]`` and ``METHODS["dpo"]``
(every loss of ``losses.LOSSES``, alone or as a weighted sum, on pairs or on unpaired KTO rows). A
step turns one batch (the contract in data/rows.py) into ``(loss, metrics)``; the loop, optimizer and
reference strategy live elsewhere (train.py, reference.py). LD-DPO's length-desensitised sums and
WPO's weights are computed here, from the log-probs, for every loss alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from preftune import loss_terms
from preftune.config import DPOConfig, SFTConfig
from preftune.errors import PreftuneError
from preftune.logprobs import SequenceLogps
from preftune.losses import LOSSES, SeqLogps, kto_reference_point, sft_nll

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
    ref = SeqLogps.from_sequences(plain, counts, batch["num_pairs"])
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


def unpaired_metrics(
    loss: Tensor, policy: SeqLogps, chosen_rewards: Tensor, rejected_rewards: Tensor, kl: Tensor
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


def policy_logps(policy: SequenceLogps, batch: dict, cfg: DPOConfig) -> tuple[SeqLogps, Tensor | None]:
    """The policy's per-sequence log-probs of a batch (LD-DPO sums under ``cfg.ld_alpha``) and WPO's
    per-pair weights ``[B]`` under ``cfg.wpo``: ``w = exp(mean_t (log p_t - log sum_v p_v^2))`` of the
    chosen times that of the rejected completion, without gradient (Zhou et al. 2024, eq. 2; as TRL 1.16)."""
    seq, n = tail_segments(batch)
    out = sequence_logps_of(policy, batch, cfg.chunked_logps, seq, n, sum_sq_probs=cfg.wpo)
    plain, tail, counts = _split_sums(out[0], out[1], batch["num_seqs"])
    labels = batch.get("labels")
    pol = SeqLogps.from_sequences(plain, counts, batch["num_pairs"], labels)
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


def reference_seqlogps(reference_logps: dict[str, Tensor], policy: SeqLogps, cfg: DPOConfig) -> SeqLogps:
    """The reference's SeqLogps for this batch, with LD-DPO's sums under ``cfg.ld_alpha``."""
    ref = SeqLogps.from_reference(reference_logps, policy)
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
        ref = reference_seqlogps(reference_logps, pol, cfg)
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


METHODS: dict[str, Method] = {
    "sft": Method(step=sft_step, needs_reference=lambda cfg: False, units=scored_tokens_of, data="sft"),
    "dpo": Method(step=dpo_step, needs_reference=dpo_needs_reference),
}
"""Method name -> Method. ``dpo`` covers every loss of ``losses.LOSSES`` through ``dpo.loss``."""
