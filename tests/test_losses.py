"""Hand-computed values for every loss in preftune.losses, and the table's wiring."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.config import DPOConfig
from preftune.errors import PreftuneError
from preftune.losses import (
    LOSSES,
    REFERENCE_FREE,
    SeqLogps,
    dpo_sigmoid,
    hinge,
    ipo,
    orpo,
    robust,
    sft_nll,
    simpo,
)

# Two pairs used throughout. Pair 0: policy chosen/rejected -10/-12, reference -11/-11, so the chosen
# log-ratio is +1, the rejected one -1 and h = 2. Pair 1: policy == reference (h = 0).
PC = torch.tensor([-10.0, -7.0])
PR = torch.tensor([-12.0, -9.0])
RC = torch.tensor([-11.0, -7.0])
RR = torch.tensor([-11.0, -9.0])
LN2 = math.log(2)


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_dpo_sigmoid_hand_values():
    """beta = 0.1. Pair 0: beta h = 0.2, loss = -log sigma(0.2) = log(1 + e^-0.2) = log(1.8187307531)
    = 0.5981388693. Pair 1: h = 0, loss = ln 2 = 0.6931471806. Rewards beta * log-ratio: (0.1, -0.1), (0, 0)."""
    losses, cr, rr = dpo_sigmoid(PC, PR, RC, RR, beta=0.1)
    close(losses, [0.5981388693, LN2])
    close(cr, [0.1, 0.0])
    close(rr, [-0.1, 0.0])


def test_dpo_sigmoid_label_smoothing_is_cdpo():
    """cDPO, eps = 0.1, pair 0: -0.9 log sigma(0.2) - 0.1 log sigma(-0.2). log sigma(-x) = log sigma(x) - x, so
    = 0.9 * 0.5981388693 + 0.1 * (0.5981388693 + 0.2) = 0.6181388693. Pair 1 stays ln 2 (sigma(0) = 1/2 either way)."""
    losses, _, _ = dpo_sigmoid(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    close(losses, [0.6181388693, LN2])


def test_ipo_summed_and_per_token():
    """beta = 0.1, so the target 1 / (2 beta) = 5.
    Summed: pair 0 h = 2, (2 - 5)^2 = 9; pair 1 h = 0, 25.
    Per-token with chosen counts (4, 1) and rejected counts (2, 1): pair 0 h = 1/4 - (-1/2) = 0.75,
    (0.75 - 5)^2 = 18.0625; pair 1 still 25. Rewards stay beta * summed log-ratios: (0.1, -0.1)."""
    losses, cr, rr = ipo(PC, PR, RC, RR, beta=0.1)
    close(losses, [9.0, 25.0], tol=1e-5)
    losses, cr, rr = ipo(
        PC,
        PR,
        RC,
        RR,
        beta=0.1,
        chosen_counts=torch.tensor([4.0, 1.0]),
        rejected_counts=torch.tensor([2.0, 1.0]),
    )
    close(losses, [18.0625, 25.0], tol=1e-5)
    close(cr, [0.1, 0.0])
    close(rr, [-0.1, 0.0])


def test_hinge_hand_values():
    """beta = 0.1: pair 0 relu(1 - 0.2) = 0.8, pair 1 relu(1 - 0) = 1. beta = 1: pair 0 relu(1 - 2) = 0."""
    close(hinge(PC, PR, RC, RR, beta=0.1)[0], [0.8, 1.0])
    close(hinge(PC, PR, RC, RR, beta=1.0)[0], [0.0, 1.0])


def test_robust_hand_values():
    """eps = 0.1, a = -log sigma(0.2) = 0.5981388693, -log sigma(-0.2) = a + 0.2.
    Pair 0: (0.9 a - 0.1 (a + 0.2)) / 0.8 = (0.8 a - 0.02) / 0.8 = a - 0.025 = 0.5731388693.
    Pair 1: (0.9 ln 2 - 0.1 ln 2) / 0.8 = ln 2 (unbiased: robust DPO keeps ln 2 at h = 0 for every eps)."""
    losses, cr, rr = robust(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    close(losses, [0.5731388693, LN2])
    close(cr, [0.1, 0.0])
    with pytest.raises(PreftuneError, match="label_smoothing"):
        robust(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)


def test_simpo_hand_values():
    """beta = 2, gamma = 0.5, mean log-probs chosen -1.0, rejected -1.5:
    x = 2 * (-1.0 + 1.5) - 0.5 = 0.5, loss = log(1 + e^-0.5) = log(1.6065306597) = 0.4740769842.
    Rewards beta * means: -2.0, -3.0. With eps = 0.2: 0.8 * 0.4740769842 + 0.2 * (0.4740769842 + 0.5)
    = 0.5740769842."""
    losses, cr, rr = simpo(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    close(losses, [0.4740769842])
    close(cr, [-2.0])
    close(rr, [-3.0])
    close(simpo(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 0.5, label_smoothing=0.2)[0], [0.5740769842])


def test_orpo_hand_values():
    """lambda = 0.1, mean log-probs chosen -ln 2 (P = 1/2, odds 1), rejected -ln 4 (P = 1/4, odds 1/3).
    log OR = ln 1 - ln(1/3) = ln 3; log sigma(ln 3) = ln(3/4) = -0.2876820725.
    loss = NLL + lambda * (-log sigma) = ln 2 + 0.1 * 0.2876820725 = 0.7219153878.
    Rewards lambda * means: -0.0693147181, -0.1386294361."""
    losses, cr, rr = orpo(torch.tensor([-LN2]), torch.tensor([-2 * LN2]), orpo_lambda=0.1)
    close(losses, [0.7219153878])
    close(cr, [-0.0693147181])
    close(rr, [-0.1386294361])


def test_orpo_is_stable_near_zero_and_very_negative_logps():
    """log(1 - e^m) must stay finite for m -> 0- (P -> 1) and m << 0, where the naive form breaks."""
    losses, _, _ = orpo(torch.tensor([-1e-7, -80.0]), torch.tensor([-50.0, -1e-6]), orpo_lambda=0.5)
    assert torch.isfinite(losses).all()


def test_sft_nll_is_token_mean():
    """Sums (-6, -2) over (3, 1) tokens: -(-8) / 4 = 2 (token mean, not the mean of per-sequence means 1.5)."""
    close(sft_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 1.0])), 2.0)


def test_table_entries_use_cfg_fields():
    """The table passes cfg through: sigmoid beta 0.1 -> pair 0 0.5981388693; ipo 'mean' uses the counts
    (chosen 4, rejected 2 tokens -> 18.0625) and 'sum' does not (9)."""
    counts_c, counts_r = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 1.0])
    pol = SeqLogps(PC, PR, PC / counts_c, PR / counts_r, counts_c, counts_r)
    ref = SeqLogps(RC, RR, RC / counts_c, RR / counts_r, counts_c, counts_r)
    close(LOSSES["sigmoid"](pol, ref, DPOConfig(beta=0.1))[0], [0.5981388693, LN2])
    close(LOSSES["ipo"](pol, ref, DPOConfig(beta=0.1, ipo_normalize="mean"))[0], [18.0625, 25.0], tol=1e-5)
    close(LOSSES["ipo"](pol, ref, DPOConfig(beta=0.1, ipo_normalize="sum"))[0], [9.0, 25.0], tol=1e-5)
    assert REFERENCE_FREE == {"simpo", "orpo"}
    for name in REFERENCE_FREE:
        LOSSES[name](pol, None, DPOConfig(loss=name))
    for name in set(LOSSES) - REFERENCE_FREE:
        with pytest.raises(PreftuneError, match="reference"):
            LOSSES[name](pol, None, DPOConfig(loss=name))


def test_seqlogps_split_follows_batch_contract():
    """Sums (-1, -2, -3, -4) with counts (1, 2, 3, 4) for B = 2: chosen (-1, -2), rejected (-3, -4), means
    (-1, -1), (-1, -1); reference means default to reference sums over the policy's counts."""
    pol = SeqLogps.from_sequences(
        torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), 2
    )
    close(pol.chosen, [-1.0, -2.0])
    close(pol.rejected_mean, [-1.0, -1.0])
    ref = SeqLogps.from_reference(
        {"chosen": torch.tensor([-2.0, -4.0]), "rejected": torch.tensor([-6.0, -8.0])}, pol
    )
    close(ref.chosen_mean, [-2.0, -2.0])
    close(ref.rejected_mean, [-2.0, -2.0])
    with pytest.raises(PreftuneError, match="batch contract"):
        SeqLogps.from_sequences(torch.zeros(3), torch.ones(3), 2)
