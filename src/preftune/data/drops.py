"""The drop policy: which reasons are bad data (counted, never fatal), which are filters the user
asked for, the ``data.max_drop_fraction`` check, and the one-paragraph drop summary a run logs
before its first step. Counting itself lives with the readers (sources.py) and tokenize.py."""

from __future__ import annotations

from typing import Any

from preftune.errors import DataError

QUALITY = frozenset({"empty_completion", "empty_prompt", "chosen_equals_rejected", "prompt_mismatch",
                     "prompt_too_long"})
"""Data-quality drops: the row is well formed but unusable. Always counted, never fatal on their own."""
FILTERS = frozenset({"score_ratio", "max_rows", "max_eval_rows", "mixture_fraction"})
"""Rows left out because the config asked for it; not counted against ``max_drop_fraction``."""


def is_quality(reason: str) -> bool:
    return reason in QUALITY


def combine(read, *tokenized) -> dict[str, Any]:
    """One account of a stage's data: ``rows_read == rows_kept + sum(dropped)``, with the bad
    (quality + malformed) share that ``max_drop_fraction`` bounds. ``read`` is a DataReport,
    ``tokenized`` the TokenizeReports of its splits."""
    dropped = dict(read.dropped)
    for t in tokenized:
        for reason, n in t.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    bad = {k: v for k, v in dropped.items() if k not in FILTERS}
    kept = sum(t.kept for t in tokenized)
    return {"rows_read": read.rows_read, "rows_kept": kept, "dropped": dict(sorted(dropped.items())),
            "bad": sum(bad.values()), "bad_fraction": sum(bad.values()) / read.rows_read if read.rows_read else 0.0}


def _reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def summary_line(account: dict[str, Any]) -> str:
    """``read 2312 rows, kept 128, left out 2184 by the config (max_rows=2184), dropped 0 (none); 0.0% bad``:
    rows the config's limits and filters left out are counted apart from those dropped as unusable."""
    asked = {k: v for k, v in account["dropped"].items() if k in FILTERS}
    dropped = {k: v for k, v in account["dropped"].items() if k not in FILTERS}
    left_out = f", left out {sum(asked.values())} by the config ({_reasons(asked)})" if asked else ""
    return (f"data: read {account['rows_read']} rows, kept {account['rows_kept']}{left_out}, dropped "
            f"{sum(dropped.values())} ({_reasons(dropped)}); {100 * account['bad_fraction']:.1f}% bad data or malformed")


def over_limit(account: dict[str, Any], max_drop_fraction: float) -> bool:
    return account["bad_fraction"] > max_drop_fraction


def check(account: dict[str, Any], max_drop_fraction: float, source: str) -> None:
    """Stop when more than ``max_drop_fraction`` of the rows read were bad or malformed."""
    if over_limit(account, max_drop_fraction):
        bad = {k: v for k, v in account["dropped"].items() if k not in FILTERS}
        raise DataError(
            f"{account['bad']} of {account['rows_read']} rows ({100 * account['bad_fraction']:.1f}%) were dropped as bad "
            f"or malformed, more than data.max_drop_fraction={max_drop_fraction}: {_reasons(bad)}. This usually means "
            "a wrong data.format or data.columns mapping; check with `preftune data inspect`, or raise "
            "data.max_drop_fraction if the data really is this noisy", source, field="data.max_drop_fraction")
