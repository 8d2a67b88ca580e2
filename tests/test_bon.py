"""Best-of-n: the best sample per prompt by a hand-made reward, prompts whose samples all tie counted and
left out, the reward summary by hand; the end-to-end ``preftune bon`` run is at the bottom."""

from __future__ import annotations

import pytest

from preftune.bon import best_samples, reward_summary
from preftune.data.rows import PreferenceRow


def rows(n: int) -> list[PreferenceRow]:
    return [PreferenceRow(f"prompt {i}", "c", "r", {"id": i}) for i in range(n)]


def test_best_samples_and_ties() -> None:
    responses = [["a", "bb", "ccc"], ["x", "y", "z"], ["p", "q", "r"], ["m", "n", "o"]]
    scores = [[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [None, None, None], [None, 2.0, -1.0]]
    best, counts = best_samples(rows(4), responses, scores)
    assert [(b["prompt"], b["completion"], b["meta"]["reward"]) for b in best] == [("prompt 0", "bb", 0.9),
                                                                                   ("prompt 3", "n", 2.0)]
    assert counts == {"all_tied": 1, "unscored": 1}
    best, counts = best_samples(rows(1), [["a", "b"]], [[3.0, 3.0]])  # equal best: all tie
    assert best == [] and counts["all_tied"] == 1


def test_reward_summary_by_hand() -> None:
    """Rewards {1, 2, 3} and {4, 6}: mean 16/5 = 3.2; best mean (3 + 6)/2 = 4.5; worst mean (1 + 4)/2 = 2.5;
    gain ((3 - 2) + (6 - 5))/2 = 1."""
    s = reward_summary([[1.0, 2.0, 3.0], [4.0, None, 6.0]])
    assert (s["scored"], s["min"], s["max"], s["median"]) == (5, 1.0, 6.0, 3.0)
    assert s["mean"] == pytest.approx(3.2)
    assert (s["best_mean"], s["worst_mean"], s["best_gain"]) == (4.5, 2.5, 1.0)
