"""Win-rate statistics against hand-computed values: Wilson interval, both-order scoring, bootstrap
CIs, the length-controlled win-rate, and the summary table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preftune.eval.stats import (
    bootstrap_mean_ci,
    both_order_score,
    length_controlled_winrate,
    paired_bootstrap,
    summarize,
    wilson_interval,
)


def test_wilson_interval_hand_computed():
    """z = 1.96, z² = 3.8416.

    8/10: p = 0.8, 1 + z²/n = 1.38416; center = (0.8 + 3.8416/20)/1.38416 = 0.99208/1.38416 = 0.716738;
          half = 1.96·sqrt(0.8·0.2/10 + 3.8416/400)/1.38416 = 1.96·sqrt(0.025604)/1.38416 = 0.226581
          -> (0.490157, 0.943319).
    0/10: center = half = 0.19208/1.38416 = 0.138770 -> (0, 0.277540).
    10/10: the mirror image of 0/10 -> (0.722460, 1).
    5/10: center 0.5, half = 1.96·sqrt(0.025 + 0.009604)/1.38416 = 0.263410 -> (0.236590, 0.763410)."""
    assert wilson_interval(8, 10, z=1.96) == pytest.approx((0.490157, 0.943319), abs=1e-6)
    assert wilson_interval(0, 10, z=1.96) == pytest.approx((0.0, 0.277540), abs=1e-6)
    assert wilson_interval(10, 10, z=1.96) == pytest.approx((0.722460, 1.0), abs=1e-6)
    assert wilson_interval(5, 10, z=1.96) == pytest.approx((0.236590, 0.763410), abs=1e-6)
    # the default z is the exact 95% quantile, 1.959964: within 1e-5 of the z = 1.96 figures
    assert wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)


def test_wilson_agrees_with_scipy_for_whole_counts():
    from scipy.stats import binomtest

    for n in range(1, 41):
        for k in range(n + 1):
            ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)


def test_wilson_ties_count_half_and_empty_is_uninformative():
    """7 wins + 2 ties of 10 = 8 wins' worth -> the 8/10 interval; n = 0 -> (0, 1)."""
    assert wilson_interval(7 + 0.5 * 2, 10) == wilson_interval(8, 10)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize(("first", "second", "score"), [
    ("win", "win", 1.0), ("loss", "loss", 0.0),
    ("win", "loss", 0.5), ("loss", "win", 0.5),
    ("tie", "tie", 0.5), ("win", "tie", 0.5), ("tie", "loss", 0.5),
    ("invalid", "win", None), ("loss", "invalid", None), ("invalid", "invalid", None),
])
def test_both_order_table(first, second, score):
    assert both_order_score(first, second) == score


def test_both_order_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="verdict"):
        both_order_score("A", "win")


def test_bootstrap_constant_is_zero_width_and_seeded():
    """Every resample of a constant has the same mean: the CI is the point itself."""
    mean, low, high = bootstrap_mean_ci([0.25] * 30, n_boot=500, seed=3)
    assert mean == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)
    values = np.random.default_rng(0).normal(size=40)
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    assert bootstrap_mean_ci(values, seed=7) != bootstrap_mean_ci(values, seed=8)
    assert all(math.isnan(x) for x in bootstrap_mean_ci([]))


def test_bootstrap_matches_normal_approximation():
    """100 values, half 0 and half 1: mean 0.5, standard error 0.5/sqrt(100) = 0.05, so the 95% CI
    is about 0.5 ± 1.96·0.05 = (0.402, 0.598)."""
    mean, low, high = bootstrap_mean_ci([0, 1] * 50, n_boot=4000, seed=0)
    assert mean == 0.5
    assert low == pytest.approx(0.402, abs=0.015) and high == pytest.approx(0.598, abs=0.015)


def test_paired_bootstrap_cancels_shared_prompt_variation():
    """b varies wildly from prompt to prompt and a = b + 0.1 exactly: the paired difference is the
    constant 0.1 with a zero-width CI, whatever the spread of the scores themselves. A pair with a
    None (invalid) score is left out."""
    b = list(np.random.default_rng(1).uniform(0, 1, size=50))
    a = [x + 0.1 for x in b]
    mean, low, high = paired_bootstrap(a + [None], b + [0.3], seed=0)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))
    diffs = [x - y for x, y in zip(a, b)]
    assert paired_bootstrap(diffs, seed=4) == paired_bootstrap(a, b, seed=4)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_length_control_when_length_explains_the_wins():
    """Length difference x (in units of 10 characters): at x = +1 the model wins 15 of 20, at x = -1 it
    wins 1 of 4, at x = 0 it wins 1 of 2. The win fractions 0.75, 0.25, 0.5 lie exactly on
    sigmoid(0 + ln3·x), so the maximum-likelihood fit is a = 0, b = ln 3 (every group's residual sums
    to zero): the raw win-rate 17/26 = 0.654 comes from being longer, and at equal length it is 0.5."""
    scores = [1] * 15 + [0] * 5 + [1] + [0] * 3 + [1, 0]
    len_model = [110] * 20 + [90] * 4 + [100] * 2
    len_ref = [100] * 26
    assert np.mean(scores) == pytest.approx(17 / 26)
    assert length_controlled_winrate(scores, len_model, len_ref) == pytest.approx(0.5, abs=1e-4)


def test_length_control_when_length_explains_nothing():
    """The model wins 3 of 4 when longer and 3 of 4 when shorter: b = 0, a = logit(0.75), so the
    length-controlled rate equals the raw 0.75. With no length variation it is the plain rate, and a
    tie counts as half a win (0.5 + 1 + 0 + 1)/4 = 0.625."""
    scores = [1, 1, 1, 0] * 2
    assert length_controlled_winrate(scores, [110] * 4 + [90] * 4, [100] * 8) == pytest.approx(0.75, abs=1e-6)
    assert length_controlled_winrate([0.5, 1, 0, 1], [5] * 4, [5] * 4) == pytest.approx(0.625, abs=1e-6)


def test_length_control_penalises_a_long_winner():
    """Wins drawn from sigmoid(-0.5 + 2x) with x mostly positive (the model is longer): the raw rate is
    high but the rate at equal length is sigmoid(-0.5) = 0.378 (within sampling error of 4000 draws)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.8, 1.0, size=4000)
    wins = (rng.uniform(size=x.size) < 1 / (1 + np.exp(-(-0.5 + 2 * x)))).astype(float)
    assert wins.mean() > 0.6
    lc = length_controlled_winrate(wins, 100 + 10 * x, np.full(x.size, 100.0), scale=10.0)
    assert lc == pytest.approx(1 / (1 + math.exp(0.5)), abs=0.04)


def test_summarize_hand_counted():
    """Scores over two categories: helpful [1, 1, 0.5, 0, None], harmless [1, 0].

    All: wins 3, ties 1, losses 2, invalid 1, n 6, winrate (3 + 0.5)/6 = 0.583333, Wilson(3.5, 6).
    helpful: wins 2, ties 1, losses 1, invalid 1, n 4, winrate 2.5/4 = 0.625. harmless: 1 of 2 = 0.5.
    Mean lengths exclude the invalid prompt: model (10+20+30+40+60+70)/6 = 38.333, reference 10."""
    scores = [1, 1, 0.5, 0, None, 1, 0]
    cats = ["helpful"] * 5 + ["harmless"] * 2
    len_model = [10, 20, 30, 40, 50, 60, 70]
    out = summarize(scores, cats, len_model, [10] * 7)
    assert {k: out[k] for k in ("wins", "ties", "losses", "invalid", "n")} == \
        {"wins": 3, "ties": 1, "losses": 2, "invalid": 1, "n": 6}
    assert out["winrate"] == pytest.approx(3.5 / 6)
    assert (out["ci_low"], out["ci_high"]) == wilson_interval(3.5, 6)
    assert out["mean_len_model"] == pytest.approx(230 / 6) and out["mean_len_reference"] == 10
    assert 0 <= out["lc_winrate"] <= 1
    helpful, harmless = out["by_category"]["helpful"], out["by_category"]["harmless"]
    assert (helpful["wins"], helpful["ties"], helpful["losses"], helpful["invalid"]) == (2, 1, 1, 1)
    assert helpful["winrate"] == pytest.approx(0.625) and harmless["winrate"] == 0.5
    empty = summarize([None, None])
    assert empty["n"] == 0 and empty["invalid"] == 2 and math.isnan(empty["winrate"])
    assert (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)
