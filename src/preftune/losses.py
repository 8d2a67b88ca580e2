"""Preference and SFT losses as pure functions of per-sequence log-probs, and the table ``LOSSES`` that
the DPO step picks from. No model, no batch layout here: log-probs come from logprobs.py.

Shapes: ``B`` is the number of pairs. Every ``*_logps`` argument is a float tensor ``[B]``: the summed
(or, where named ``*_mean``, per-token mean) log-probability of a completion given its prompt.
Every loss returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the rewards are
detached and follow TRL 1.16's convention for that loss, so logged metrics compare with TRL's.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.config import DPOConfig
from preftune.errors import PreftuneError

LossOutput = tuple[Tensor, Tensor, Tensor]


class SeqLogps(NamedTuple):
    """Per-sequence completion log-probs of one batch of B pairs, all ``[B]``.

    ``chosen``/``rejected`` are sums over completion tokens, ``*_mean`` the per-token means and
    ``*_count`` the number of scored completion tokens (float)."""

    chosen: Tensor
    rejected: Tensor
    chosen_mean: Tensor
    rejected_mean: Tensor
    chosen_count: Tensor
    rejected_count: Tensor

    @classmethod
    def from_sequences(cls, sums: Tensor, counts: Tensor, num_pairs: int) -> SeqLogps:
        """Split ``[2B]`` sums/counts of the batch contract (chosen i -> i, rejected i -> B + i)."""
        if sums.shape[0] != 2 * num_pairs:
            raise PreftuneError(
                f"expected 2 x {num_pairs} sequences (chosen then rejected) in a preference batch, got "
                f"{sums.shape[0]}; the collate function must follow the batch contract in data/rows.py"
            )
        counts = counts.to(sums.dtype)
        means = sums / counts.clamp(min=1)
        b = num_pairs
        return cls(sums[:b], sums[b:], means[:b], means[b:], counts[:b], counts[b:])

    @classmethod
    def from_reference(cls, reference: dict[str, Tensor], policy: SeqLogps) -> SeqLogps:
        """Reference log-probs from a dict with ``chosen``/``rejected`` sums (``[B]``) and optionally
        ``chosen_mean``/``rejected_mean``; missing means use the policy's token counts (same tokens)."""
        chosen = reference["chosen"].to(policy.chosen)
        rejected = reference["rejected"].to(policy.rejected)
        chosen_mean = reference.get("chosen_mean")
        rejected_mean = reference.get("rejected_mean")
        return cls(
            chosen,
            rejected,
            chosen_mean.to(chosen) if chosen_mean is not None else chosen / policy.chosen_count.clamp(min=1),
            rejected_mean.to(rejected)
            if rejected_mean is not None
            else rejected / policy.rejected_count.clamp(min=1),
            policy.chosen_count,
            policy.rejected_count,
        )


# ------------------------------------------------------------------ the pure math


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigma(x) - eps log sigma(-x)``: binary cross-entropy with soft label ``1 - eps``."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _dpo_rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_sigmoid(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative DPO (cDPO, Mitchell 2023) label smoothing.

    With ``h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))`` (all ``[B]``, sums):
        ``L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``
    ``eps = 0`` is plain DPO and equals TRL 1.16's ``loss_type="sigmoid"``; TRL 1.16 has no smoothing
    on ``sigmoid`` (only on ``robust``), so cDPO with ``eps > 0`` is checked against hand values only.
    Rewards: ``beta * (policy - reference)`` summed log-probs."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = _smoothed_logsigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return (losses, *_dpo_rewards(beta, chosen_logratios, rejected_logratios))


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    chosen_counts: Tensor | None = None,
    rejected_counts: Tensor | None = None,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17), ``tau = beta``: ``L = (h - 1 / (2 beta))^2``.

    ``h`` is the difference of the chosen and rejected log-ratios. Given ``chosen_counts`` /
    ``rejected_counts`` (``[B]`` completion token counts) each log-ratio is divided by its count, i.e.
    ``h`` uses per-token mean log-probs: TRL 1.16's choice (confirmed with the IPO authors, they say).
    Without counts ``h`` uses summed log-probs, as the paper's equation reads; the squared loss then
    grows with completion length. Rewards are always ``beta * (policy - reference)`` summed log-probs,
    as TRL logs them."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_h, rejected_h = chosen_logratios, rejected_logratios
    if chosen_counts is not None and rejected_counts is not None:
        chosen_h = chosen_logratios / chosen_counts.clamp(min=1)
        rejected_h = rejected_logratios / rejected_counts.clamp(min=1)
    losses = (chosen_h - rejected_h - 1 / (2 * beta)) ** 2
    return (losses, *_dpo_rewards(beta, chosen_logratios, rejected_logratios))


def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """Hinge / SLiC (Zhao et al. 2023, eq. 2 with the reference ratio as in TRL): ``L = max(0, 1 - beta h)``,
    ``h`` the difference of summed log-ratios. Rewards: ``beta * (policy - reference)``."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return (losses, *_dpo_rewards(beta, chosen_logratios, rejected_logratios))


def robust(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), an unbiased loss under label-flip rate ``eps``:
        ``L = (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)``,  ``0 <= eps < 0.5``.
    Same formula as TRL 1.16's ``loss_type="robust"``; ``eps = 0`` is plain DPO.
    Rewards: ``beta * (policy - reference)``."""
    if not 0 <= label_smoothing < 0.5:
        raise PreftuneError(
            f"dpo.label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}"
        )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = label_smoothing * F.logsigmoid(-logits)
    losses = (clean + flipped) / (1 - 2 * label_smoothing)
    return (losses, *_dpo_rewards(beta, chosen_logratios, rejected_logratios))


def simpo(
    policy_chosen_mean_logps: Tensor,
    policy_rejected_mean_logps: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6), reference-free, on per-token mean log-probs:
        ``L = -log sigma(beta * mean log pi(y_w|x) - beta * mean log pi(y_l|x) - gamma)``
    ``gamma`` is the absolute target reward margin, exactly TRL's ``CPOConfig.simpo_gamma`` (TRL
    writes it as ``beta * (logits - gamma / beta)``, the same number). ``label_smoothing > 0`` gives
    TRL CPO's smoothed form ``-(1-eps) log sigma(x) - eps log sigma(-x)``.
    Rewards: ``beta * mean log-probs`` (TRL CPO)."""
    logits = beta * (policy_chosen_mean_logps - policy_rejected_mean_logps) - gamma
    losses = _smoothed_logsigmoid_loss(logits, label_smoothing)
    return losses, beta * policy_chosen_mean_logps.detach(), beta * policy_rejected_mean_logps.detach()


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2`` (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(
    policy_chosen_mean_logps: Tensor, policy_rejected_mean_logps: Tensor, orpo_lambda: float
) -> LossOutput:
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free, on per-token mean log-probs ``m_w``, ``m_l``:
        ``odds(y|x) = P / (1 - P)`` with ``P = exp(m)``,
        ``log OR = (m_w - m_l) - (log(1 - exp(m_w)) - log(1 - exp(m_l)))``
        ``L = -m_w - lambda * log sigma(log OR)``   (chosen NLL + lambda * odds-ratio term)
    The NLL here is the per-token mean over the chosen *completion* (the paper's L_SFT). TRL's
    experimental ORPOTrainer averages its NLL over prompt and completion tokens of the whole batch
    instead; its odds-ratio term is the same. Rewards: ``lambda * mean log-probs`` (TRL's ORPO uses
    its ``beta``, which is this lambda). Computed in fp32 at least."""
    dtype = torch.promote_types(policy_chosen_mean_logps.dtype, torch.float32)
    chosen, rejected = policy_chosen_mean_logps.to(dtype), policy_rejected_mean_logps.to(dtype)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -chosen - orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * chosen.detach(), orpo_lambda * rejected.detach()


def sft_nll(logps_sums: Tensor, token_counts: Tensor) -> Tensor:
    """Token-mean negative log-likelihood over a batch: ``-sum_s logp_s / sum_s n_s`` (a scalar).

    ``logps_sums [S]`` are per-sequence summed completion log-probs and ``token_counts [S]`` their
    token counts, so prompt tokens are already masked out (completion-only) by what was scored.
    This is both the SFT loss and the RPO-style chosen-NLL term (TRL 1.16's ``loss_type="sft"``)."""
    return -logps_sums.sum() / token_counts.sum().clamp(min=1)


# ------------------------------------------------------------------ the table

LossFn = Callable[[SeqLogps, "SeqLogps | None", DPOConfig], LossOutput]


def _needs(reference: SeqLogps | None, loss: str) -> SeqLogps:
    if reference is None:
        raise PreftuneError(
            f"dpo.loss={loss!r} needs reference log-probs; set dpo.reference to copy, adapter or precomputed"
        )
    return reference


def _sigmoid_entry(p: SeqLogps, r: SeqLogps | None, cfg: DPOConfig) -> LossOutput:
    r = _needs(r, "sigmoid")
    return dpo_sigmoid(p.chosen, p.rejected, r.chosen, r.rejected, cfg.beta, cfg.label_smoothing)


def _ipo_entry(p: SeqLogps, r: SeqLogps | None, cfg: DPOConfig) -> LossOutput:
    r = _needs(r, "ipo")
    counts = {"mean": (p.chosen_count, p.rejected_count), "sum": (None, None)}[cfg.ipo_normalize]
    return ipo(p.chosen, p.rejected, r.chosen, r.rejected, cfg.beta, *counts)


def _hinge_entry(p: SeqLogps, r: SeqLogps | None, cfg: DPOConfig) -> LossOutput:
    r = _needs(r, "hinge")
    return hinge(p.chosen, p.rejected, r.chosen, r.rejected, cfg.beta)


def _robust_entry(p: SeqLogps, r: SeqLogps | None, cfg: DPOConfig) -> LossOutput:
    r = _needs(r, "robust")
    return robust(p.chosen, p.rejected, r.chosen, r.rejected, cfg.beta, cfg.label_smoothing)


def _simpo_entry(p: SeqLogps, r: SeqLogps | None, cfg: DPOConfig) -> LossOutput:
    return simpo(p.chosen_mean, p.rejected_mean, cfg.beta, cfg.gamma, cfg.label_smoothing)


def _orpo_entry(p: SeqLogps, r: SeqLogps | None, cfg: DPOConfig) -> LossOutput:
    return orpo(p.chosen_mean, p.rejected_mean, cfg.orpo_lambda)


LOSSES: dict[str, LossFn] = {
    "sigmoid": _sigmoid_entry,
    "ipo": _ipo_entry,
    "hinge": _hinge_entry,
    "robust": _robust_entry,
    "simpo": _simpo_entry,
    "orpo": _orpo_entry,
}
"""``dpo.loss`` -> ``fn(policy, reference, cfg) -> (losses [B], chosen_rewards [B], rejected_rewards [B])``."""

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo"})
"""Losses that use no reference model (their entries ignore ``reference``)."""


def get_loss(name: str) -> LossFn:
    """The table entry for ``dpo.loss``, or a PreftuneError listing the choices."""
    if name not in LOSSES:
        raise PreftuneError(f"dpo.loss: unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
