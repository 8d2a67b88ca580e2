"""Preference and SFT losses as pure functions of per-sequence log-probs, and the table ``LOSSES``: one
``Loss`` entry per ``dpo.loss`` name with its function, its typed parameters, whether it needs a
reference, which log-probs it reads and its Hub tag. No model, no batch layout, no config parsing here:
log-probs come from logprobs.py, ``dpo.loss`` is read by config.py, the step that sums terms is methods.py.

Shapes: ``B`` is the number of pairs (or unpaired rows). Every ``*_logps`` argument is a float tensor
``[B]``: the summed (or, where named ``*_mean``, per-token mean) log-probability of a completion given
its prompt. Every loss returns ``(losses [B], chosen_rewards, rejected_rewards)``; the rewards are
detached and follow TRL 1.16's convention for that loss, so logged metrics compare with TRL's.
``h`` below is the DPO margin ``(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))``.

Adding a loss: write its function and its parameter dataclass, add one ``Loss`` entry to ``LOSSES``
and its hand-computed test in tests/test_losses.py. Config checking, the CLI help, the loss table of
docs/methods.md, model-card tags and the evaluation suite all read the table.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import PreftuneError

LossOutput = tuple[Tensor, Tensor, Tensor]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


class SeqLogps(NamedTuple):
    """Per-sequence completion log-probs of one batch of B pairs, all ``[B]``.

    ``chosen``/``rejected`` are sums over completion tokens (LD-DPO-weighted under ``dpo.ld_alpha``),
    ``*_mean`` the plain per-token means and ``*_count`` the number of scored completion tokens
    (float). An unpaired (KTO) batch puts each row's own completion in ``chosen``, its mismatched
    KL completion in ``rejected``, and whether the row is desirable in ``labels`` (bool ``[B]``)."""

    chosen: Tensor
    rejected: Tensor
    chosen_mean: Tensor
    rejected_mean: Tensor
    chosen_count: Tensor
    rejected_count: Tensor
    labels: Tensor | None = None

    @classmethod
    def from_sequences(cls, sums: Tensor, counts: Tensor, num_pairs: int, labels: Tensor | None = None) -> SeqLogps:
        """Split ``[2B]`` sums/counts of the batch contract (chosen i -> i, rejected i -> B + i)."""
        if sums.shape[0] != 2 * num_pairs:
            raise PreftuneError(
                f"expected 2 x {num_pairs} sequences (chosen then rejected) in a preference batch, got "
                f"{sums.shape[0]}; the collate function must follow the batch contract in data/rows.py"
            )
        counts = counts.to(sums.dtype)
        means = sums / counts.clamp(min=1)
        b = num_pairs
        return cls(sums[:b], sums[b:], means[:b], means[b:], counts[:b], counts[b:], labels)

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
            policy.labels,
        )


# ------------------------------------------------------------------ shared pieces


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigma(x) - eps log sigma(-x)``: binary cross-entropy with soft label ``1 - eps``."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _dpo_rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def f_divergence_scores(logratios: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """``f'(pi / ref)`` of f-DPO (Wang et al. 2023, "Beyond Reverse KL", its table of f'), from the
    log-ratio ``u = log pi - log ref`` ``[B]``:
        reverse_kl ``u`` (DPO); forward_kl ``1 - e^-u``; js_divergence ``log 2 + log sigma(u)``;
        alpha_divergence ``(e^((alpha - 1) u) - 1) / (alpha - 1)`` (``u`` at ``alpha = 1``).
    As TRL 1.16 computes them, including its clamp of ``(alpha - 1) u`` at 80 before the exponential."""
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratios
        t = torch.clamp(((f_alpha - 1.0) * logratios).float(), max=80.0)
        return (torch.exp(t) - 1.0).to(logratios.dtype) / (f_alpha - 1.0)
    raise PreftuneError(f"unknown f_divergence {f_divergence!r}; choose one of {', '.join(FDivergence.__args__)}")


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return pc - rc, pr - rr


# ------------------------------------------------------------------ the DPO family (reference-based)


def dpo_sigmoid(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative DPO (cDPO, Mitchell 2023) label smoothing.

    With ``h`` the margin of summed log-ratios (of their f-divergence scores, f-DPO):
        ``L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``
    ``eps = 0`` is plain DPO and equals TRL 1.16's ``loss_type="sigmoid"``; TRL 1.16 has no smoothing
    on ``sigmoid`` (only on ``robust``), so cDPO with ``eps > 0`` is checked against hand values only.
    Rewards: ``beta * (policy - reference)`` summed log-probs."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = f_divergence_scores(cl, f_divergence, f_alpha) - f_divergence_scores(rl, f_divergence, f_alpha)
    losses = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
    return (losses, *_dpo_rewards(beta, cl, rl))


def sigmoid_norm(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_counts: Tensor,
    rejected_counts: Tensor,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024; OLMo 2's default): DPO on per-token
    log-ratios, ``L = -log sigma(beta (u_w / |y_w| - u_l / |y_l|))``, ``u`` the summed log-ratios (or their
    f-divergence scores) and ``|y|`` the completion token counts ``[B]``. TRL 1.16's ``sigmoid_norm``.
    Rewards: ``beta * (policy - reference)`` summed log-probs (TRL)."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = (f_divergence_scores(cl, f_divergence, f_alpha) / chosen_counts.clamp(min=1)
         - f_divergence_scores(rl, f_divergence, f_alpha) / rejected_counts.clamp(min=1))
    return (-F.logsigmoid(beta * h), *_dpo_rewards(beta, cl, rl))


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    chosen_counts: Tensor | None = None,
    rejected_counts: Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17), ``tau = beta``: ``L = (h - 1 / (2 beta))^2``.

    ``h`` is the difference of the chosen and rejected log-ratios. Given ``chosen_counts`` /
    ``rejected_counts`` (``[B]`` completion token counts) each log-ratio is divided by its count, i.e.
    ``h`` uses per-token mean log-probs: TRL 1.16's choice (confirmed with the IPO authors, they say).
    Without counts ``h`` uses summed log-probs, as the paper's equation reads; the squared loss then
    grows with completion length. Rewards are always ``beta * (policy - reference)`` summed log-probs,
    as TRL logs them."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen_h, rejected_h = f_divergence_scores(cl, f_divergence, f_alpha), f_divergence_scores(rl, f_divergence, f_alpha)
    if chosen_counts is not None and rejected_counts is not None:
        chosen_h = chosen_h / chosen_counts.clamp(min=1)
        rejected_h = rejected_h / rejected_counts.clamp(min=1)
    losses = (chosen_h - rejected_h - 1 / (2 * beta)) ** 2
    return (losses, *_dpo_rewards(beta, cl, rl))


def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """Hinge / SLiC (Zhao et al. 2023, eq. 2 with the reference ratio as in TRL): ``L = max(0, 1 - beta h)``,
    ``h`` the difference of summed log-ratios. Rewards: ``beta * (policy - reference)``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = f_divergence_scores(cl, f_divergence, f_alpha) - f_divergence_scores(rl, f_divergence, f_alpha)
    return (torch.relu(1 - beta * h), *_dpo_rewards(beta, cl, rl))


def robust(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), an unbiased loss under label-flip rate ``eps``:
        ``L = (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)``,  ``0 <= eps < 0.5``.
    Same formula as TRL 1.16's ``loss_type="robust"``; ``eps = 0`` is plain DPO.
    Rewards: ``beta * (policy - reference)``."""
    if not 0 <= label_smoothing < 0.5:
        raise PreftuneError(
            f"dpo.label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}"
        )
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    logits = beta * (f_divergence_scores(cl, f_divergence, f_alpha) - f_divergence_scores(rl, f_divergence, f_alpha))
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = label_smoothing * F.logsigmoid(-logits)
    losses = (clean + flipped) / (1 - 2 * label_smoothing)
    return (losses, *_dpo_rewards(beta, cl, rl))


def exo_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization", eq. 16 with K = 2): the reverse
    KL from the model's pair distribution ``q = softmax(beta h)`` over (chosen, rejected) to the
    smoothed label distribution ``p = (1 - eps, eps)``:
        ``L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)``, ``q_w = sigma(beta h)``, ``q_l = sigma(-beta h)``
    ``eps > 0`` is required (the paper uses 1e-3). TRL 1.16's ``exo_pair``. Rewards: ``beta * (policy - reference)``."""
    if not 0 < label_smoothing < 1:
        raise PreftuneError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {label_smoothing}")
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    x = beta * (f_divergence_scores(cl, f_divergence, f_alpha) - f_divergence_scores(rl, f_divergence, f_alpha))
    losses = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-label_smoothing))
              + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(label_smoothing)))
    return (losses, *_dpo_rewards(beta, cl, rl))


def nca_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment", its pairwise loss), on the
    rewards ``r = beta * (log pi - log ref)`` of each completion:
        ``L = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)``
    TRL 1.16's ``nca_pair``. Rewards: ``r_w``, ``r_l``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    rw, rr_ = beta * cl, beta * rl
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rr_)
    return (losses, *_dpo_rewards(beta, cl, rl))


def bco_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """BCO for pairs (Jung et al. 2024, "Binary Classifier Optimization", without its reward shift, as
    TRL 1.16's ``bco_pair``): chosen classified as good, rejected as bad,
        ``L = -log sigma(r_w) - log sigma(-r_l)``, ``r = beta * (log pi - log ref)``.
    Rewards: ``r_w``, ``r_l``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(beta * cl) - F.logsigmoid(-beta * rl)
    return (losses, *_dpo_rewards(beta, cl, rl))


def sppo_hard(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7
    with ``P(y_w > y_l) = 1``, ``P(y_l > y_w) = 0``), with ``u`` the summed log-ratios:
        ``L = (u_w - 1 / (2 beta))^2 + (u_l + 1 / (2 beta))^2``
    TRL 1.16's ``sppo_hard``. Rewards: ``beta * u``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    return (losses, *_dpo_rewards(beta, cl, rl))


def aot(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport"): the
    batch's policy margins ``m = log pi(y_w) - log pi(y_l)`` and reference margins are each sorted
    (``sort`` over the batch), and their sorted differences ``d`` go through the smoothed logistic
        ``L_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i)``
    (a first-order stochastic dominance of the policy's margins over the reference's). Loss ``i``
    belongs to the ``i``-th quantile, not to pair ``i``. TRL 1.16's ``aot``. Rewards: ``beta * (policy - reference)``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_margins, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    losses = _smoothed_logsigmoid_loss(beta * (margins - ref_margins), label_smoothing)
    return (losses, *_dpo_rewards(beta, cl, rl))


def aot_unpaired(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024): the chosen log-ratios ``u_w`` and the rejected
    log-ratios ``u_l`` of the batch are sorted separately and compared quantile by quantile,
        ``L_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i)``, ``d = sort(u_w) - sort(u_l)``.
    TRL 1.16's ``aot_unpaired``. Rewards: ``beta * (policy - reference)``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    d = torch.sort(cl, dim=0)[0] - torch.sort(rl, dim=0)[0]
    return (_smoothed_logsigmoid_loss(beta * d, label_smoothing), *_dpo_rewards(beta, cl, rl))


def apo_zero(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7): raise the
    chosen likelihood and lower the rejected one, each anchored at the reference,
        ``L = (1 - sigma(beta u_w)) + sigma(beta u_l)``
    (for chosen outputs better than the model's own). TRL 1.16's ``apo_zero``. Rewards: ``beta * u``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = (1 - torch.sigmoid(beta * cl)) + torch.sigmoid(beta * rl)
    return (losses, *_dpo_rewards(beta, cl, rl))


def apo_down(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both likelihoods, the rejected one more,
        ``L = sigma(beta u_w) + (1 - sigma(beta (u_w - u_l)))``
    (for chosen outputs worse than the model's own). TRL 1.16's ``apo_down``. Rewards: ``beta * u``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = torch.sigmoid(beta * cl) + (1 - torch.sigmoid(beta * (cl - rl)))
    return (losses, *_dpo_rewards(beta, cl, rl))


def discopop(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for LLMs", eq. 5), with ``x = beta h``:
        ``L = (1 - sigma(x / tau)) (-log sigma(x)) + sigma(x / tau) e^-x``
    a blend of the logistic (DPO) and exponential losses, moving to the exponential as ``x`` grows.
    TRL 1.16's ``discopop`` (``discopop_tau``). Rewards: ``beta * (policy - reference)``."""
    cl, rl = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    x = beta * (f_divergence_scores(cl, f_divergence, f_alpha) - f_divergence_scores(rl, f_divergence, f_alpha))
    mix = torch.sigmoid(x / tau)
    return (-F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix, *_dpo_rewards(beta, cl, rl))


# ------------------------------------------------------------------ reference-free


def sft_nll(logps_sums: Tensor, token_counts: Tensor) -> Tensor:
    """Token-mean negative log-likelihood over a batch: ``-sum_s logp_s / sum_s n_s`` (a scalar).

    ``logps_sums [S]`` are per-sequence summed completion log-probs and ``token_counts [S]`` their
    token counts, so prompt tokens are already masked out (completion-only) by what was scored.
    This is both the SFT loss and the RPO-style chosen-NLL term (TRL 1.16's ``loss_type="sft"``)."""
    return -logps_sums.sum() / token_counts.sum().clamp(min=1)


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


def alphapo(
    policy_chosen_mean_logps: Tensor,
    policy_rejected_mean_logps: Tensor,
    beta: float,
    gamma: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment"): SimPO with
    the length-normalised reward reshaped by ``alpha``. With ``p = exp(mean log pi(y|x))`` (so
    ``p^-alpha = pi(y|x)^(-alpha / |y|)``):
        ``r(y) = (1 - p^-alpha) / alpha``,   ``L = -log sigma(beta (r(y_w) - r(y_l)) - gamma)``
    ``alpha -> 0`` gives ``r = mean log pi``, i.e. SimPO. As TRL's experimental CPOTrainer
    (``loss_type="alphapo"``: simpo with ``alpha``, no NLL term); checked against hand values.
    Rewards: ``beta * r``."""
    if alpha == 0.0:
        return simpo(policy_chosen_mean_logps, policy_rejected_mean_logps, beta, gamma, label_smoothing)
    rw = (1 - torch.exp(-alpha * policy_chosen_mean_logps)) / alpha
    rl = (1 - torch.exp(-alpha * policy_rejected_mean_logps)) / alpha
    losses = _smoothed_logsigmoid_loss(beta * (rw - rl) - gamma, label_smoothing)
    return losses, beta * rw.detach(), beta * rl.detach()


def cpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
    beta: float,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", eq. 3 plus its NLL term), reference-free, on
    summed log-probs: a DPO-style preference term with the reference dropped, plus ``alpha`` times
    the chosen NLL (``chosen_nll``: the batch's chosen token-mean NLL, a scalar added to every pair):
        ``L = -(1 - eps) log sigma(beta m) - eps log sigma(-beta m) + alpha * NLL(y_w)``,
        ``m = log pi(y_w|x) - log pi(y_l|x)``
    As TRL's experimental CPOTrainer (``loss_type="sigmoid"``, ``cpo_alpha``); checked against hand values.
    Rewards: ``beta * summed log-probs``."""
    m = policy_chosen_logps - policy_rejected_logps
    losses = _smoothed_logsigmoid_loss(beta * m, label_smoothing) + alpha * chosen_nll
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


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


# ------------------------------------------------------------------ unpaired (KTO)


def kto_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z_0`` (Ethayarajh et al. 2024, eq. 7 and section 4.1): the batch estimate
    of ``KL(pi || ref)`` from mismatched (prompt, completion) pairs ``[B]``, ``max(0, mean(log pi - log ref))``,
    detached (no gradient flows through ``z_0``). As TRL 1.16 computes it on one process."""
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    reference_point: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7) on
    unpaired rows: ``u = log pi(y|x) - log ref(y|x)`` (sums, ``[B]``), ``labels`` (bool ``[B]``) desirable,
        desirable:   ``L = lambda_D (1 - sigma(beta (u - z_0)))``
        undesirable: ``L = lambda_U (1 - sigma(beta (z_0 - u)))``
    with ``z_0`` from :func:`kto_reference_point`. TRL 1.16's KTOTrainer ``loss_type="kto"``.
    Returns ``(losses [B], chosen_rewards [n_D], rejected_rewards [n_U])``, rewards ``beta * u`` of the
    desirable and of the undesirable rows."""
    u = policy_logps - reference_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (u - reference_point)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - u)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = beta * u.detach()
    return losses, rewards[labels], rewards[~labels]


def apo_zero_unpaired(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """APO-zero for unpaired rows (D'Oosterlinck et al. 2024, eq. 7 split by label):
        desirable ``L = lambda_D (1 - sigma(beta u))``, undesirable ``L = lambda_U sigma(beta u)``,
    ``u`` the summed log-ratio. TRL 1.16's KTOTrainer ``loss_type="apo_zero_unpaired"`` (no KL term).
    Returns and rewards as :func:`kto`."""
    u = policy_logps - reference_logps
    losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * u)),
                         undesirable_weight * torch.sigmoid(beta * u))
    rewards = beta * u.detach()
    return losses, rewards[labels], rewards[~labels]


# ------------------------------------------------------------------ parameters, one dataclass per loss


@dataclass(frozen=True)
class Beta:
    beta: float = 0.1
    """Strength of the KL penalty: the scale of the implicit reward ``beta * log(pi / ref)``."""

    def problems(self) -> list[str]:
        return [] if self.beta > 0 else [f"beta: must be positive, got {self.beta}"]


@dataclass(frozen=True)
class FDivergenceParams(Beta):
    f_divergence: FDivergence = "reverse_kl"
    """f-DPO: the divergence regularising the policy (reverse_kl is DPO's)."""
    f_alpha: float = 0.5
    """alpha of the alpha-divergence (``f_divergence: alpha_divergence`` only)."""


@dataclass(frozen=True)
class SigmoidParams(FDivergenceParams):
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped, in [0, 0.5)."""

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        return out


@dataclass(frozen=True)
class RobustParams(SigmoidParams):
    label_smoothing: float = 0.0
    """Label-flip rate the loss is unbiased under, in [0, 0.5)."""


@dataclass(frozen=True)
class IPOParams(FDivergenceParams):
    normalize: Literal["mean", "sum"] = "mean"
    """Log-ratios as per-token means (TRL's choice) or sums (the paper's equation)."""


@dataclass(frozen=True)
class ExoParams(FDivergenceParams):
    label_smoothing: float = 1e-3
    """eps of the target distribution (1 - eps, eps); must be above 0 (the EXO paper uses 1e-3)."""

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 < self.label_smoothing < 1:
            out.append(f"label_smoothing: exo_pair needs a value in (0, 1) (the paper uses 1e-3), got "
                       f"{self.label_smoothing}")
        return out


@dataclass(frozen=True)
class AOTParams(Beta):
    label_smoothing: float = 0.0
    """Soft label of the logistic on the sorted margins, in [0, 0.5)."""


@dataclass(frozen=True)
class DiscoPOPParams(FDivergenceParams):
    tau: float = 0.05
    """Temperature of the logistic/exponential mixing (TRL's ``discopop_tau``; the paper's 0.05)."""


@dataclass(frozen=True)
class NoParams:
    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class SimPOParams(Beta):
    gamma: float = 0.5
    """Target reward margin (absolute, TRL's ``simpo_gamma``)."""
    label_smoothing: float = 0.0
    """Soft label of TRL CPO's smoothed logistic, in [0, 0.5)."""


@dataclass(frozen=True)
class AlphaPOParams(SimPOParams):
    alpha: float = 0.25
    """Reward shape: ``r = (1 - p^-alpha) / alpha`` with ``p`` the per-token geometric mean probability; 0 is SimPO."""


@dataclass(frozen=True)
class CPOParams(Beta):
    alpha: float = 1.0
    """Weight of the chosen NLL term (TRL's ``cpo_alpha``)."""
    label_smoothing: float = 0.0
    """Soft label of the logistic, in [0, 0.5)."""


@dataclass(frozen=True)
class ORPOParams:
    lambda_: float = 0.1
    """Weight of the odds-ratio term added to the chosen NLL (the paper's lambda, TRL's ORPO ``beta``)."""

    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class KTOParams(Beta):
    desirable_weight: float = 1.0
    """lambda_D: weight of the desirable rows' losses."""
    undesirable_weight: float = 1.0
    """lambda_U: weight of the undesirable rows' losses."""


# ------------------------------------------------------------------ the table

LossFn = Callable[[SeqLogps, "SeqLogps | None", Any], LossOutput]


@dataclass(frozen=True)
class Loss:
    """One entry of ``LOSSES``: ``fn(policy, reference, params) -> (losses [B], chosen_rewards,
    rejected_rewards)`` with ``params`` an instance of ``params``."""

    fn: LossFn
    params: type
    needs_reference: bool
    reads: Literal["sums", "means"]
    """Which policy log-probs the loss reads: summed or per-token mean."""
    tag: str
    """The Hub/model-card tag of the method family."""
    summary: str
    """One line for the CLI help and the loss table of docs/methods.md."""
    unpaired: bool = False
    """Reads an unpaired batch (rows with labels and mismatched KL completions) instead of pairs."""
    per_pair: bool = True
    """Loss ``i`` belongs to pair ``i`` (false for AOT, which sorts the batch), so WPO can weight it."""

    @property
    def param_names(self) -> list[str]:
        return [param_key(f.name) for f in dataclasses.fields(self.params)]

    @property
    def f_divergence(self) -> bool:
        """Takes ``f_divergence`` (the losses on which TRL allows an f-divergence)."""
        return "f_divergence" in self.param_names


def param_key(field_name: str) -> str:
    """A parameter's config key: the field name without a trailing underscore (``lambda_`` -> ``lambda``)."""
    return field_name.rstrip("_")


def _ref(reference: SeqLogps | None, loss: str) -> SeqLogps:
    if reference is None:
        raise PreftuneError(
            f"dpo.loss={loss!r} needs reference log-probs; set dpo.reference to copy, adapter or precomputed"
        )
    return reference


def _fdiv(q) -> dict:
    return {"f_divergence": q.f_divergence, "f_alpha": q.f_alpha}


def _pair_entry(name: str, fn: Callable, *keys: str, fdiv: bool = False) -> LossFn:
    """A table adapter for a reference-based pair loss ``fn(pc, pr, rc, rr, beta, **{key: params.key})``."""
    def entry(p: SeqLogps, r: SeqLogps | None, q) -> LossOutput:
        r = _ref(r, name)
        extra = {k: getattr(q, k) for k in keys} | (_fdiv(q) if fdiv else {})
        return fn(p.chosen, p.rejected, r.chosen, r.rejected, q.beta, **extra)

    return entry


def _ipo_entry(p: SeqLogps, r: SeqLogps | None, q: IPOParams) -> LossOutput:
    r = _ref(r, "ipo")
    counts = (p.chosen_count, p.rejected_count) if q.normalize == "mean" else (None, None)
    return ipo(p.chosen, p.rejected, r.chosen, r.rejected, q.beta, *counts, **_fdiv(q))


def _sigmoid_norm_entry(p: SeqLogps, r: SeqLogps | None, q: FDivergenceParams) -> LossOutput:
    r = _ref(r, "sigmoid_norm")
    return sigmoid_norm(p.chosen, p.rejected, r.chosen, r.rejected, p.chosen_count, p.rejected_count, q.beta,
                        **_fdiv(q))


def _sft_entry(p: SeqLogps, r: SeqLogps | None, q: NoParams) -> LossOutput:
    """The chosen token-mean NLL (a batch scalar) on every pair; rewards are the per-token mean log-probs."""
    nll = sft_nll(p.chosen_mean * p.chosen_count, p.chosen_count)
    return nll.expand(p.chosen.shape[0]), p.chosen_mean.detach(), p.rejected_mean.detach()


def _unpaired_entry(name: str, fn: Callable, kl: bool) -> LossFn:
    def entry(p: SeqLogps, r: SeqLogps | None, q: KTOParams) -> LossOutput:
        r = _ref(r, name)
        labels = p.labels
        if labels is None:  # a preference batch (reward evaluation): chosen desirable, rejected not, z_0 = 0
            n = p.chosen.shape[0]
            labels = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]).to(p.chosen.device)
            pol, ref = torch.cat([p.chosen, p.rejected]), torch.cat([r.chosen, r.rejected])
            point = torch.zeros((), dtype=pol.dtype, device=pol.device)
        else:
            pol, ref = p.chosen, r.chosen
            point = kto_reference_point(p.rejected, r.rejected)
        args = (q.beta, q.desirable_weight, q.undesirable_weight)
        return fn(pol, ref, labels, point, *args) if kl else fn(pol, ref, labels, *args)

    return entry


LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(_pair_entry("sigmoid", dpo_sigmoid, "label_smoothing", fdiv=True), SigmoidParams, True, "sums",
                    "dpo", "DPO (Rafailov et al. 2023); label_smoothing > 0 is cDPO"),
    "hinge": Loss(_pair_entry("hinge", hinge, fdiv=True), FDivergenceParams, True, "sums", "dpo",
                  "SLiC hinge on the reward margin (Zhao et al. 2023)"),
    "ipo": Loss(_ipo_entry, IPOParams, True, "sums", "dpo",
                "IPO squared loss (Azar et al. 2023), per-token means as TRL (normalize: sum for the paper's sums)"),
    "exo_pair": Loss(_pair_entry("exo_pair", exo_pair, "label_smoothing", fdiv=True), ExoParams, True, "sums", "dpo",
                     "EXO: reverse KL to the smoothed preference (Ji et al. 2024)"),
    "nca_pair": Loss(_pair_entry("nca_pair", nca_pair), Beta, True, "sums", "dpo",
                     "NCA: absolute rewards by noise-contrastive alignment (Chen et al. 2024)"),
    "robust": Loss(_pair_entry("robust", robust, "label_smoothing", fdiv=True), RobustParams, True, "sums", "dpo",
                   "robust DPO, unbiased under label-flip rate label_smoothing (Chowdhury et al. 2024)"),
    "bco_pair": Loss(_pair_entry("bco_pair", bco_pair), Beta, True, "sums", "dpo",
                     "BCO: chosen and rejected as a binary classification (Jung et al. 2024)"),
    "sppo_hard": Loss(_pair_entry("sppo_hard", sppo_hard), Beta, True, "sums", "dpo",
                      "SPPO with hard win probabilities (Wu et al. 2024)"),
    "aot": Loss(_pair_entry("aot", aot, "label_smoothing"), AOTParams, True, "sums", "dpo",
                "AOT: optimal-transport alignment of sorted margins, paired (Melnyk et al. 2024)", per_pair=False),
    "aot_unpaired": Loss(_pair_entry("aot_unpaired", aot_unpaired, "label_smoothing"), AOTParams, True, "sums",
                         "dpo", "AOT on separately sorted chosen and rejected log-ratios (Melnyk et al. 2024)",
                         per_pair=False),
    "apo_zero": Loss(_pair_entry("apo_zero", apo_zero), Beta, True, "sums", "dpo",
                     "APO-zero: chosen up, rejected down, anchored (D'Oosterlinck et al. 2024)"),
    "apo_down": Loss(_pair_entry("apo_down", apo_down), Beta, True, "sums", "dpo",
                     "APO-down: both down, rejected more (D'Oosterlinck et al. 2024)"),
    "discopop": Loss(_pair_entry("discopop", discopop, "tau", fdiv=True), DiscoPOPParams, True, "sums", "dpo",
                     "DiscoPOP: logistic/exponential blend by log-ratio (Chris Lu et al. 2024)"),
    "sigmoid_norm": Loss(_sigmoid_norm_entry, FDivergenceParams, True, "sums", "dpo",
                         "length-normalised DPO on per-token log-ratios (Tülu 3, OLMo 2)"),
    "sft": Loss(_sft_entry, NoParams, False, "means", "sft",
                "chosen token-mean NLL; with a DPO loss in a list it is RPO (Pang et al. 2024)"),
    "simpo": Loss(lambda p, r, q: simpo(p.chosen_mean, p.rejected_mean, q.beta, q.gamma, q.label_smoothing),
                  SimPOParams, False, "means", "simpo", "SimPO: mean log-probs with a target margin (Meng et al. 2024)"),
    "alphapo": Loss(lambda p, r, q: alphapo(p.chosen_mean, p.rejected_mean, q.beta, q.gamma, q.alpha,
                                            q.label_smoothing),
                    AlphaPOParams, False, "means", "alphapo", "AlphaPO: SimPO with a reshaped reward (Gupta et al. 2025)"),
    "cpo": Loss(lambda p, r, q: cpo(p.chosen, p.rejected, sft_nll(p.chosen_mean * p.chosen_count, p.chosen_count),
                                    q.beta, q.alpha, q.label_smoothing),
                CPOParams, False, "sums", "cpo", "CPO: reference-free DPO term plus chosen NLL (Xu et al. 2024)"),
    "orpo": Loss(lambda p, r, q: orpo(p.chosen_mean, p.rejected_mean, q.lambda_), ORPOParams, False, "means", "orpo",
                 "ORPO: chosen NLL plus lambda x odds-ratio term (Hong et al. 2024)"),
    "kto": Loss(_unpaired_entry("kto", kto, kl=True), KTOParams, True, "sums", "kto",
                "KTO on unpaired rows, reference point from mismatched pairs (Ethayarajh et al. 2024)", unpaired=True),
    "apo_zero_unpaired": Loss(_unpaired_entry("apo_zero_unpaired", apo_zero_unpaired, kl=False), KTOParams, True,
                              "sums", "kto", "APO-zero on unpaired rows (D'Oosterlinck et al. 2024)", unpaired=True),
}
"""``dpo.loss`` name -> its ``Loss`` entry."""

REFERENCE_FREE: frozenset[str] = frozenset(n for n, spec in LOSSES.items() if not spec.needs_reference)
"""Losses that use no reference model (their entries ignore ``reference``)."""


def get_loss(name: str) -> Loss:
    """The table entry for ``dpo.loss``, or a PreftuneError listing the choices."""
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PreftuneError(f"dpo.loss: unknown loss {name!r}{hint}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_table(markdown: bool = False) -> str:
    """Every loss of the table with its parameters (and defaults), its reference need and its summary:
    ``preftune losses``, and with ``markdown`` the loss table of docs/methods.md."""
    rows = []
    for name, spec in LOSSES.items():
        params = ", ".join(f"`{param_key(f.name)}`={f.default!r}" for f in dataclasses.fields(spec.params)) or "-"
        reads = "unpaired rows" if spec.unpaired else f"{spec.reads}"
        ref = "yes" if spec.needs_reference else "no"
        rows.append((f"`{name}`", params, ref, reads, spec.summary))
    if markdown:
        head = ["| `dpo.loss` | parameters (defaults) | reference | reads | what it optimises |", "|---|---|---|---|---|"]
        return "\n".join(head + [f"| {' | '.join(r)} |" for r in rows])
    return "\n".join(f"{n.strip('`'):18} reference={r:3} reads={d:13} {s}\n{'':18} {p.replace('`', '')}"
                     for n, p, r, d, s in rows)
