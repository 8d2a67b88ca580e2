"""The demo pipeline end to end: the shipped quickstart config with the tiny random model and a few
steps writes every stage's outputs, and its report holds the figures."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.pipeline import QUICKSTART


@pytest.mark.e2e
def test_quickstart_pipeline_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "qs"
    rc = main(["pipeline", str(QUICKSTART), "model=tiny", f"output_dir={out}", "data.max_rows=16",
               "data.max_eval_rows=8", "sft.max_steps=2", "dpo.max_steps=4", "dpo.eval_every=2",
               "eval.winrate.per_category=1", "eval.winrate.max_new_tokens=8", "eval.heldout.max_chunks=2",
               "eval.tasks_limit=4"])
    assert rc == 0
    printed = capsys.readouterr().out
    for stage in ("sft", "dpo"):
        run = json.loads((out / stage / "run.json").read_text())
        assert run["steps"] >= 2 and (out / stage / "final" / "adapter_config.json").is_file()
        assert (out / stage / "metrics.jsonl").is_file() and (out / stage / "final" / "README.md").is_file()
    assert (out / "sft" / "merged" / "config.json").is_file()
    dpo_metrics = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert dpo_metrics[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # the SFT model is the reference
    assert any("eval/rewards/accuracies" in m for m in dpo_metrics)

    results = json.loads((out / "eval" / "eval.json").read_text())
    models = results["models"]
    assert set(models) == {"base", "sft", "dpo"}
    for name in ("sft", "dpo"):
        assert 0.0 <= models[name]["rewards"]["rewards/accuracies"] <= 1.0
        assert "diff_vs_base" in models[name]["heldout"]
    for name in models:
        assert {"winrate", "heldout", "tasks", "checked"} <= set(models[name])
    assert "checked_accuracy" in results["comparisons"]["dpo-base"]
    assert set(json.loads((out / "timings.json").read_text())) == {"sft", "dpo", "eval", "report"}

    md = (out / "report" / "report.md").read_text()
    html = (out / "report" / "report.html").read_text()
    acc = f"{models['dpo']['rewards']['rewards/accuracies']:.3f}"
    bpb = f"{models['base']['heldout']['bpb']:.4f}"
    for text in (md, html):
        assert acc in text and bpb in text
    assert "data:image/png;base64," in html
    for png in ("rewards_accuracies.png", "winrate.png", "forgetting.png", "loss_margins.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in printed and "dpo" in printed and acc in printed
