"""The evaluation suite end to end on tiny models: every section in eval.json, the paired held-out
difference, the on-disk cache (a second evaluation recomputes nothing, a changed model is
recomputed), and the ``preftune eval`` command with its table."""

from __future__ import annotations

import json
import shutil

import pytest

import preftune.eval.generate
import preftune.eval.heldout
from preftune.cli import main as cli_main
from preftune.config.validate import config_from_dict
from preftune.embedded import tiny_llama
from preftune.eval.suite import evaluate_models, winrate_rows

pytestmark = pytest.mark.e2e

CHECKABLE = {"check": "number", "answer": "4"}  # meta the rule judge checks (preftune.eval.checks.check)


@pytest.fixture
def setup(tmp_path, monkeypatch, tiny_model_dir, tuned_dir):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"What is 2 + 2? (variant {i})", "chosen": "4", "rejected": "5",
             "category": "math" if i % 2 else "chat", "meta": CHECKABLE} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tuned = shutil.copytree(tuned_dir, tmp_path / "tuned")  # a copy: one test re-saves it
    raw = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"source": str(data), "test_size": 0.5, "max_length": 64, "max_prompt_length": 32},
           "eval": {"batch_size": 4, "tasks": ["embedded:mc"], "tasks_limit": 4,
                    "winrate": {"judge": "rule", "per_category": 3, "max_new_tokens": 4},
                    "heldout": {"chunk_length": 32, "max_chunks": 4}}}
    return config_from_dict(raw), {"base": str(tiny_model_dir), "tuned": str(tuned)}, tmp_path


def _spy(monkeypatch, module, name: str) -> list:
    """Count calls of a real function (it still runs)."""
    calls, real = [], getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_suite_sections_and_cache(setup, monkeypatch):
    cfg, models, tmp = setup
    gen_calls = _spy(monkeypatch, preftune.eval.generate, "generate")
    loss_calls = _spy(monkeypatch, preftune.eval.heldout, "heldout_loss")
    out = evaluate_models(cfg, models, tmp / "eval", reference_for={"tuned": models["base"]})
    on_disk = json.loads((tmp / "eval" / "eval.json").read_text())
    assert on_disk["models"].keys() == out["models"].keys() == {"base", "tuned"}
    base, tuned = out["models"]["base"], out["models"]["tuned"]

    assert "rewards" not in base  # no reference for the base
    assert tuned["rewards"]["n"] == 8 and 0 <= tuned["rewards"]["rewards/accuracies"] <= 1
    for e in (base, tuned):
        w = e["winrate"]
        assert w["vs"] == "chosen" and w["wins"] + w["ties"] + w["losses"] + w["invalid"] == 6
        assert set(w["by_category"]) == {"chat", "math"} and w["ci_low"] <= w["ci_high"]
        h = e["heldout"]
        assert h["n_tokens"] == 4 * 31 and h["n_chunks"] == 4 and h["bpb"] > 0
        assert 0 <= e["tasks"]["embedded:mc"]["acc"] <= 1 and e["tasks"]["embedded:mc"]["n"] == 4
    diff = tuned["heldout"]["diff_vs_base"]
    assert diff["mean"] == pytest.approx(tuned["heldout"]["bpb"] - base["heldout"]["bpb"], abs=1e-9)
    assert "diff_vs_base" not in base["heldout"]
    assert set(out["comparisons"]) == {"tuned-base"}
    samples = [json.loads(x) for x in (tmp / "eval" / "samples-tuned.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["chosen"] == "4" for s in samples)
    assert (len(gen_calls), len(loss_calls)) == (2, 2)

    # a second evaluation (another run of a sweep) reuses generations, losses and judgments
    again = evaluate_models(cfg, {"base": models["base"]}, tmp / "eval2")
    assert (len(gen_calls), len(loss_calls)) == (2, 2)
    assert again["models"]["base"]["heldout"] == {k: v for k, v in base["heldout"].items()}
    assert again["models"]["base"]["winrate"]["calls"] == 0
    assert again["models"]["base"]["tasks"] == base["tasks"]

    # a retrained (re-saved) model is not served stale results
    tiny_llama(models["tuned"], seed=2)
    evaluate_models(cfg, {"tuned": models["tuned"]}, tmp / "eval3")
    assert (len(gen_calls), len(loss_calls)) == (3, 3)


def test_winrate_rows_per_category():
    from preftune.data.rows import PreferenceRow

    rows = [PreferenceRow(f"p{i}", "a", "b", {"category": "x" if i < 5 else "y"}) for i in range(8)]
    picked = winrate_rows(rows, 2)
    assert [r.prompt for r in picked] == ["p0", "p1", "p5", "p6"]


def test_eval_command_prints_a_table(setup, capsys):
    cfg, models, tmp = setup
    cfg_path = tmp / "cfg.yaml"
    from preftune.config import to_yaml

    cfg.eval.tasks = []
    cfg.eval.rewards = False
    cfg_path.write_text(to_yaml(cfg))
    assert cli_main(["eval", str(cfg_path), "--models", "base", f"other={models['tuned']}"]) == 0
    printed = capsys.readouterr().out
    assert "model" in printed and "win-rate" in printed and "other" in printed
    result = json.loads((tmp / "run" / "eval" / "eval.json").read_text())
    assert list(result["models"]) == ["base", "other"]
    assert f"{result['models']['other']['heldout']['bpb']:.4f}" in printed


def test_without_lm_eval_the_suite_skips_tasks_and_says_why(setup, monkeypatch, capsys):
    import sys

    cfg, models, tmp = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    cfg.eval.winrate.enabled = cfg.eval.rewards = False
    out = evaluate_models(cfg, {"base": models["base"]}, tmp / "eval")
    assert "tasks" not in out["models"]["base"] and "bpb" in out["models"]["base"]["heldout"]
    assert "preftune[eval]" in out["skipped"]["tasks"] and "preftune[eval]" in capsys.readouterr().err


def test_checked_accuracy_counts_only_checkable_rows():
    """3 checkable rows (2 answered correctly) and one hand-written row: accuracy 2/3 with the
    Wilson interval of 2 of 3 (z = 1.96): centre (2 + 1.9208) / 6.8416 = 0.5731, half-width
    1.96 * sqrt(2*1/3 + 0.9604) / 6.8416 = 0.3654 -> [0.2077, 0.9385]; the hand row is None."""
    from preftune.data.rows import PreferenceRow
    from preftune.eval.suite import checked_entry

    rows = [PreferenceRow("What is 2 + 3?", "5", "6", {"category": "arithmetic", "answer": "5", "check": "number"}),
            PreferenceRow("What is 4 + 4?", "8", "9", {"category": "arithmetic", "answer": "8", "check": "number"}),
            PreferenceRow("What is 1 + 1?", "2", "3", {"category": "arithmetic", "answer": "2", "check": "number"}),
            PreferenceRow([{"role": "user", "content": "hi"}], "Hello!", "Go away.", {"category": "helpful"})]
    entry, marks = checked_entry(rows, ["2 + 3 = 5.", "It is 7.", "1 + 1 = 2", "Hello there"])
    assert marks == [1.0, 0.0, 1.0, None]
    assert entry["correct"] == 2 and entry["n"] == 3
    assert entry["accuracy"] == pytest.approx(2 / 3)
    assert entry["ci_low"] == pytest.approx(0.2077, abs=1e-3) and entry["ci_high"] == pytest.approx(0.9385, abs=1e-3)
