"""The one results table: the CLI headline, the card's Markdown and the report's rows come from the
same cells, so one model's figures read the same everywhere."""

from __future__ import annotations

from preftune.pipeline import headline
from preftune.report.table import CARD, REPORT, markdown_table, results_table

EVAL = {"models": {
    "base": {"winrate": {"winrate": 0.0667, "ci_low": 0.021, "ci_high": 0.18, "wins": 3, "ties": 1, "losses": 40,
                         "invalid": 1},
             "checked": {"accuracy": 0.1333, "ci_low": 0.06, "ci_high": 0.26}, "heldout": {"bpb": 1.12619},
             "tasks": {"t": {"acc": 0.683}}},
    "dpo": {"rewards": {"rewards/accuracies": 0.8125, "se": 0.0976}, "kl": {"kl": 0.012345},
            "heldout": {"bpb": 1.1213, "diff_vs_base": {"mean": -0.00491, "low": -0.008, "high": -0.002}}}},
    "comparisons": {"dpo-base": {"mean": 0.0556, "low": 0.0111, "high": 0.1111,
                                 "checked_accuracy": {"mean": 0.1111, "low": 0.0222, "high": 0.2222}}}}


def test_headline_reads_as_the_demo_prints_it():
    assert headline({"eval": EVAL}).splitlines() == [
        "model  reward acc  win-rate vs chosen [95% CI]  checked acc [95% CI]  bits/byte (Δ vs base)  task acc  "
        "KL/token",
        "base   -           0.067 [0.02, 0.18]           0.133 [0.06, 0.26]    1.1262                 0.683     "
        "-       ",
        "dpo    0.812       -                            -                     1.1213 (-0.0049)       -         "
        "0.0123  ",
        "dpo-base: checked accuracy +0.111 [95% CI +0.022, +0.222] (paired bootstrap); win-rate vs chosen "
        "+0.056 [+0.011, +0.111]",
    ]


def test_card_and_report_share_the_cells():
    card = markdown_table(*results_table(EVAL["models"], CARD)).splitlines()
    assert card[0] == ("| model | reward acc (± se) | win-rate vs chosen [95% CI] | bits/byte | Δ bits/byte vs base "
                       "| task acc |")
    assert card[3] == "| dpo | 0.812 ± 0.098 | - | 1.1213 | -0.0049 | - |"
    head, rows = results_table(EVAL["models"], REPORT, run="r1")
    assert head[:2] == ["run", "model"] and rows[0][:2] == ["r1", "base"]
    assert rows[0][head.index("W / T / L / invalid")] == "3 / 1 / 40 / 1"
    assert rows[1][head.index("reward acc (± se)")] == "0.812 ± 0.098"
