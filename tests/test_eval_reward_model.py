"""A reward model's calibration by margin bucket and its agreement with the rule, by hand."""

from __future__ import annotations

import math

import pytest

from preftune.data.rows import PreferenceRow
from preftune.eval.reward_model import calibration, rule_agreement


def test_calibration_by_hand() -> None:
    """Margins 0.1, -0.2 fall in [0, 0.25): accuracy 1/2, predicted (s(0.1) + s(0.2))/2; 3.0 in [2, 4): 1 of 1."""
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    table = calibration([0.1, -0.2, 3.0])
    assert [(b["margin"], b["n"], b["accuracy"]) for b in table] == [("[0, 0.25)", 2, 0.5), ("[2, 4)", 1, 1.0)]
    assert table[0]["predicted"] == pytest.approx((s(0.1) + s(0.2)) / 2)


def test_rule_agreement_only_where_the_rule_decides() -> None:
    meta = {"check": "number", "answer": "4"}
    rows = [PreferenceRow("2+2?", "4", "5", meta),  # rule: chosen right; RM agrees (m > 0)
            PreferenceRow("2+2?", "5", "4", meta),  # rule: rejected right; RM prefers chosen: disagrees
            PreferenceRow("2+2?", "4", "4", meta),  # both right: the rule does not decide
            PreferenceRow("hello", "hi", "go", {})]  # nothing to check
    out = rule_agreement(rows, [1.0, 0.5, 2.0, -1.0])
    assert (out["n"], out["agree"], out["rate"]) == (2, 1, 0.5)
