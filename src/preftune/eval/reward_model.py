"""How far to trust a reward model: its held-out accuracy (r_chosen > r_rejected) with a standard error, its
calibration (accuracy against the Bradley-Terry probability sigmoid(|margin|), by reward-margin bucket)
and, on rows with a checkable answer, its agreement with the rule's verdicts. Judging with it lives in
judges.py; scoring in reward.py."""

from __future__ import annotations

import math

from preftune.config import DataConfig
from preftune.data.rows import PreferenceRow
from preftune.eval.checks import check
from preftune.reward import score_responses

MARGIN_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)
"""Bucket edges of |r_chosen - r_rejected| for the calibration table."""


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else float("nan")


def calibration(margins: list[float]) -> list[dict]:
    """Per bucket of ``|m|`` (``m = r_chosen - r_rejected``): pairs, accuracy (``m > 0``) and the mean
    predicted probability that the reward model's pick is right, ``sigmoid(|m|)``: a calibrated model has
    the two equal. Empty buckets are left out."""
    out = []
    for lo, hi in zip(MARGIN_EDGES, MARGIN_EDGES[1:]):
        ms = [m for m in margins if lo <= abs(m) < hi]
        if ms:
            acc = sum(m > 0 for m in ms) / len(ms)
            predicted = sum(1 / (1 + math.exp(-abs(m))) for m in ms) / len(ms)
            out.append({"margin": f"[{lo:g}, {hi:g})", "n": len(ms), "accuracy": acc, "predicted": predicted})
    return out


def rule_agreement(rows: list[PreferenceRow], margins: list[float | None]) -> dict:
    """On rows whose answer can be checked and where the rule tells chosen and rejected apart (one right,
    one wrong): how often the reward model prefers the one the rule calls right."""
    agree = n = 0
    for row, m in zip(rows, margins):
        verdict = (check(row.meta, row.chosen), check(row.meta, row.rejected))
        if m is None or None in verdict or verdict[0] == verdict[1]:
            continue
        n += 1
        agree += (m > 0) == verdict[0]
    rate = agree / n if n else float("nan")
    return {"n": n, "agree": agree, "rate": rate, "se": _se(rate, n)}


def evaluate_reward_model(loaded: tuple, rows: list[PreferenceRow], data: DataConfig | None = None,
                          batch_size: int = 8) -> dict:
    """The figures of a reward model (reward.load_reward_model's triple) on held-out preference rows:
    ``accuracy`` ± ``se`` over the ``n`` pairs it could score (ties count half), ``margin`` (mean
    r_c - r_r), ``calibration`` and ``rule_agreement``; ``unscored`` pairs the tokenizer dropped."""
    prompts = [r.prompt for r in rows]
    chosen = score_responses(loaded, prompts, [r.chosen for r in rows], batch_size, data)
    rejected = score_responses(loaded, prompts, [r.rejected for r in rows], batch_size, data)
    margins = [None if c is None or r is None else c - r for c, r in zip(chosen, rejected)]
    scored = [m for m in margins if m is not None]
    n = len(scored)
    acc = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in scored) / n if n else float("nan")
    return {"accuracy": acc, "se": _se(acc, n), "n": n, "unscored": len(rows) - n,
            "margin": sum(scored) / n if n else float("nan"), "calibration": calibration(scored),
            "rule_agreement": rule_agreement(rows, margins)}


def calibration_table(result: dict) -> str:
    """The figures as Markdown: accuracy, rule agreement, then one line per margin bucket."""
    ra = result["rule_agreement"]
    lines = [f"held-out accuracy {result['accuracy']:.3f} ± {result['se']:.3f} (n={result['n']}); "
             f"agreement with the rule on checkable rows {ra['rate']:.3f} ± {ra['se']:.3f} (n={ra['n']})", "",
             "| reward margin | pairs | accuracy | sigmoid(margin) |", "|---|---|---|---|"]
    lines += [f"| {b['margin']} | {b['n']} | {b['accuracy']:.3f} | {b['predicted']:.3f} |" for b in result["calibration"]]
    return "\n".join(lines)
