"""Hand-computed values for every loss in preftune.losses, and the table's wiring."""

from __future__ import annotations

import math

import pytest
import torch

from preftune import loss_terms
from preftune.config import DPOConfig
from preftune.errors import PreftuneError
from preftune.losses import (
    LOSSES,
    REFERENCE_FREE,
    IPOParams,
    SeqLogps,
    SigmoidParams,
    alphapo,
    aot,
    apo_down,
    apo_zero,
    apo_zero_unpaired,
    bco_pair,
    cpo,
    discopop,
    dpo_sigmoid,
    exo_pair,
    f_divergence_scores,
    hinge,
    ipo,
    kto,
    kto_reference_point,
    loss_table,
    nca_pair,
    orpo,
    robust,
    sft_nll,
    sigmoid_norm,
    simpo,
    sppo_hard,
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


def test_table_entries_pass_their_parameters():
    """The table passes a loss's parameters through: sigmoid beta 0.1 -> pair 0 0.5981388693; ipo 'mean'
    uses the counts (chosen 4, rejected 2 tokens -> 18.0625) and 'sum' does not (9)."""
    counts_c, counts_r = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 1.0])
    pol = SeqLogps(PC, PR, PC / counts_c, PR / counts_r, counts_c, counts_r)
    ref = SeqLogps(RC, RR, RC / counts_c, RR / counts_r, counts_c, counts_r)
    close(LOSSES["sigmoid"].fn(pol, ref, SigmoidParams(beta=0.1))[0], [0.5981388693, LN2])
    close(LOSSES["ipo"].fn(pol, ref, IPOParams(beta=0.1, normalize="mean"))[0], [18.0625, 25.0], tol=1e-5)
    close(LOSSES["ipo"].fn(pol, ref, IPOParams(beta=0.1, normalize="sum"))[0], [9.0, 25.0], tol=1e-5)
    assert REFERENCE_FREE == {"sft", "simpo", "alphapo", "cpo", "orpo"}
    for name, spec in LOSSES.items():
        params = spec.params()
        if spec.needs_reference:
            with pytest.raises(PreftuneError, match="reference"):
                spec.fn(pol, None, params)
        else:
            losses, cr, rr = spec.fn(pol, None, params)
            assert losses.shape == (2,) and torch.isfinite(losses).all(), name
        assert spec.tag and spec.summary and spec.reads in ("sums", "means"), name


def test_every_trl_dpo_loss_type_is_in_the_table():
    """TRL 1.16's 15 DPO loss types, its KTO loss types, and CPO, SimPO, AlphaPO, ORPO."""
    trl = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert trl | {"kto", "apo_zero_unpaired", "cpo", "simpo", "alphapo", "orpo"} == set(LOSSES)
    assert {n for n, s in LOSSES.items() if s.unpaired} == {"kto", "apo_zero_unpaired"}
    assert {n for n, s in LOSSES.items() if s.f_divergence} == {
        "sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"}


def test_new_dpo_family_hand_values():
    """beta = 0.1 on the two pairs (pair 0: u_w = +1, u_l = -1, h = 2; pair 1: all zero).
    sigmoid_norm, counts chosen (4, 1), rejected (2, 1): pair 0 h = 1/4 + 1/2 = 0.75, -log sigma(0.075) = 0.6563501408.
    exo_pair eps 1e-3: pair 0 sigma(0.2)(log sigma(0.2) - log 0.999) + sigma(-0.2)(log sigma(-0.2) - log 1e-3)
      = 2.4220146207; pair 1: 1/2 (ln 1/2 - ln 0.999) + 1/2 (ln 1/2 - ln 1e-3) = 2.7612307091.
    nca_pair: pair 0 -log sigma(0.1) - 1/2 log sigma(-0.1) - 1/2 log sigma(0.1) = 1.3387933201; pair 1: 2 ln 2.
    bco_pair: pair 0 -log sigma(0.1) - log sigma(0.1) = 1.2887933201; pair 1: 2 ln 2.
    sppo_hard: 1/(2 beta) = 5: pair 0 (1 - 5)^2 + (-1 + 5)^2 = 32; pair 1 25 + 25 = 50.
    apo_zero: pair 0 1 - sigma(0.1) + sigma(-0.1) = 0.9500416250; pair 1: 1/2 + 1/2 = 1.
    apo_down: pair 0 sigma(0.1) + 1 - sigma(0.2) = 0.9751451902; pair 1: 1.
    discopop tau 0.05: pair 0 x = 0.2, m = sigma(4): -log sigma(0.2)(1 - m) + e^-0.2 m = 0.8147631411;
      pair 1: x = 0, m = 1/2: ln 2 / 2 + 1/2 = 0.8465735903.
    aot: policy margins (2, 2) and reference margins (0, 2), each sorted: d = (2, 0), so (-log sigma(0.2), ln 2)."""
    counts_c, counts_r = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 1.0])
    close(sigmoid_norm(PC, PR, RC, RR, counts_c, counts_r, beta=0.1)[0], [0.6563501408, LN2])
    close(exo_pair(PC, PR, RC, RR, beta=0.1, label_smoothing=1e-3)[0], [2.4220146207, 2.7612307091], tol=1e-5)
    close(nca_pair(PC, PR, RC, RR, beta=0.1)[0], [1.3387933201, 2 * LN2])
    close(bco_pair(PC, PR, RC, RR, beta=0.1)[0], [1.2887933201, 2 * LN2])
    close(sppo_hard(PC, PR, RC, RR, beta=0.1)[0], [32.0, 50.0], tol=1e-4)
    close(apo_zero(PC, PR, RC, RR, beta=0.1)[0], [0.9500416250, 1.0])
    close(apo_down(PC, PR, RC, RR, beta=0.1)[0], [0.9751451902, 1.0])
    close(discopop(PC, PR, RC, RR, beta=0.1, tau=0.05)[0], [0.8147631411, LN2 / 2 + 0.5])
    close(aot(PC, PR, RC, RR, beta=0.1)[0], [0.5981388693, LN2])
    for fn in (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down):  # TRL's rewards: beta * log-ratio
        close(fn(PC, PR, RC, RR, beta=0.1)[1], [0.1, 0.0])
    with pytest.raises(PreftuneError, match="label_smoothing"):
        exo_pair(PC, PR, RC, RR, beta=0.1, label_smoothing=0.0)


def test_f_divergence_scores_hand_values():
    """u = +1 and -1. forward_kl 1 - e^-u: 0.6321205588, -1.7182818285. js log 2 + log sigma(u): 0.3798854930,
    -0.6201145070. alpha = 0.5, (e^(-u/2) - 1) / (-1/2): 0.7869386806, -1.2974425414; alpha = 1 is u.
    DPO with forward_kl, beta 0.1: -log sigma(0.1 (0.6321205588 + 1.7182818285)) = 0.5825167135."""
    u = torch.tensor([1.0, -1.0])
    close(f_divergence_scores(u, "forward_kl"), [0.6321205588, -1.7182818285])
    close(f_divergence_scores(u, "js_divergence"), [0.3798854930, -0.6201145070])
    close(f_divergence_scores(u, "alpha_divergence", 0.5), [0.7869386806, -1.2974425414])
    close(f_divergence_scores(u, "alpha_divergence", 1.0), [1.0, -1.0])
    close(dpo_sigmoid(PC, PR, RC, RR, beta=0.1, f_divergence="forward_kl")[0], [0.5825167135, LN2])


def test_cpo_and_alphapo_hand_values():
    """CPO, beta 0.1, alpha 1, sums -10 / -12 and a chosen NLL of 2.5: -log sigma(0.2) + 2.5 = 3.0981388694;
    rewards beta * sums = -1.0, -1.2.
    AlphaPO, beta 2, gamma 0.5, alpha 0.5, means -1.0 / -1.5: r = (1 - e^(0.5 * 1)) / 0.5 = -1.2974425414 and
    (1 - e^(0.75)) / 0.5 = -2.2340000332; loss -log sigma(2 (r_w - r_l) - 0.5) = 0.2257933591; rewards 2 r.
    alpha = 0 falls back to SimPO exactly (0.4740769842, as in test_simpo_hand_values)."""
    losses, cr, rr = cpo(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor(2.5), beta=0.1, alpha=1.0)
    close(losses, [3.0981388694])
    close(cr, [-1.0])
    close(rr, [-1.2])
    losses, cr, rr = alphapo(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5, alpha=0.5)
    close(losses, [0.2257933591])
    close(cr, [-2.5948850828])
    close(rr, [-4.4680000665])
    close(alphapo(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 0.5, alpha=0.0)[0], [0.4740769842])


def test_kto_and_apo_zero_unpaired_hand_values():
    """Rows with log-ratios u = (1, -1, 0.5, -2), labels (desirable, undesirable, desirable, undesirable),
    beta 0.5, reference point z_0 = 0.3:
    KTO: 1 - sigma(0.5 (1 - 0.3)) = 0.4133824211, 1 - sigma(0.5 (0.3 + 1)) = 0.3429895373,
         1 - sigma(0.5 (0.5 - 0.3)) = 0.4750208125, 1 - sigma(0.5 (0.3 + 2)) = 0.2404890831;
    with weights (2, 0.5) the desirable ones double and the undesirable ones halve.
    APO-zero unpaired (no z_0): 1 - sigma(0.5), sigma(-0.5), 1 - sigma(0.25), sigma(-1)
         = 0.3775406688, 0.3775406688, 0.4378234991, 0.2689414214.
    z_0 = max(0, mean(KL log-ratios)): mean(0.5, 0.1) = 0.3; mean(-1, 0) -> 0."""
    pol, ref = torch.tensor([1.0, -1.0, 0.5, -2.0]), torch.zeros(4)
    labels = torch.tensor([True, False, True, False])
    z0 = torch.tensor(0.3)
    losses, cr, rr = kto(pol, ref, labels, z0, beta=0.5)
    close(losses, [0.4133824211, 0.3429895373, 0.4750208125, 0.2404890831])
    close(cr, [0.5, 0.25])
    close(rr, [-0.5, -1.0])
    close(kto(pol, ref, labels, z0, 0.5, 2.0, 0.5)[0], [0.8267648422, 0.1714947687, 0.9500416250, 0.1202445415])
    close(apo_zero_unpaired(pol, ref, labels, beta=0.5)[0], [0.3775406688, 0.3775406688, 0.4378234991, 0.2689414214])
    close(kto_reference_point(torch.tensor([0.5, 0.1]), torch.zeros(2)), 0.3)
    close(kto_reference_point(torch.tensor([-1.0, 0.0]), torch.zeros(2)), 0.0)


def test_loss_table_lists_every_loss_with_parameters():
    """``preftune losses`` and the methods page's table come from the table: one row per loss with its
    parameters and defaults; docs/methods.md holds exactly that table."""
    from pathlib import Path

    md = loss_table(markdown=True)
    for name in LOSSES:
        assert f"| `{name}` |" in md
    assert "`gamma`=0.5" in md and "`lambda`=0.1" in md
    page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert md in page, "docs/methods.md's loss table is stale: paste `preftune losses --markdown`"


def test_dpo_config_default_still_resolves_to_sigmoid():
    (term,) = loss_terms.terms(DPOConfig())
    assert term.name == "sigmoid" and term.weight == 1.0 and term.params == SigmoidParams(beta=0.1)


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
