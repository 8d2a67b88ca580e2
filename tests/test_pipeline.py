"""The demo pipeline end to end: the shipped quickstart config (offline DPO on, the on-policy rounds off:
test_rounds.py runs those through the pipeline) with the tiny random model and a few
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
    rc = main(["pipeline", str(QUICKSTART), "dpo.enabled=true", "rounds.n=0", "model=tiny", f"output_dir={out}", "data.max_rows=16",
               "data.max_eval_rows=8", "sft.max_steps=2", "dpo.max_steps=4", "dpo.eval_every=2",
               "eval.winrate.per_category=1", "eval.winrate.max_new_tokens=8", "eval.heldout.max_chunks=2",
               "eval.tasks_limit=4", "eval.curve_every=2", "dpo.save_every=2"])
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

    # curves over training: step 0 is DPO's starting model (the merged SFT model), step 2 a snapshot
    # holding exactly the weights of the step-2 checkpoint, step 4 the final model
    curve = json.loads((out / "eval" / "curve.json").read_text())
    points = curve["points"]
    assert [p["step"] for p in points] == [0, 2, 4]
    assert points[0]["model"] == str((out / "sft" / "merged").resolve()) and points[0]["tokens_seen"] == 0
    assert points[1]["model"] == str(out / "dpo" / "snapshots" / "step-2")
    assert points[2]["model"] == str(out / "dpo" / "final")
    seen = {m["step"]: m["tokens_seen"] for m in dpo_metrics}
    assert [p["tokens_seen"] for p in points[1:]] == [seen[2], seen[4]] and seen[2] > 0
    assert curve["best_step"] == json.loads((out / "dpo" / "run.json").read_text())["best_step"]
    for p in points:
        assert {"winrate", "checked", "tasks"} <= set(p) and 0 <= p["winrate"]["winrate"] <= 1
    _same_adapter_weights(out / "dpo" / "snapshots" / "step-2", out / "dpo" / "checkpoints" / "step-2")
    # best/ holds the weights of the curve point at the best step: same generations, same figures
    def responses(path):
        return [json.loads(line)["response"] for line in path.read_text().splitlines()]

    at_best = next(p for p in points if p["step"] == curve["best_step"])
    assert responses(out / "eval" / "curve" / f"samples-step-{at_best['step']}.jsonl") == responses(
        out / "eval" / "samples-dpo.jsonl")
    assert at_best["winrate"]["winrate"] == models["dpo"]["winrate"]["winrate"]
    assert at_best["tasks"] == models["dpo"]["tasks"]
    # the cache is keyed by content: best/ and the curve point of the same step were generated once
    # (base, sft, dpo = its best step, step 0 and the other step)
    assert len(list((tmp_path / "cache" / "eval" / "generations").glob("*.json"))) == 5

    md = (out / "report" / "report.md").read_text()
    html = (out / "report" / "report.html").read_text()
    acc = f"{models['dpo']['rewards']['rewards/accuracies']:.3f}"
    bpb = f"{models['base']['heldout']['bpb']:.4f}"
    for text in (md, html):
        assert acc in text and bpb in text
    assert "data:image/png;base64," in html
    assert "## Curves over training" in md
    for p in points:  # every curve point's win-rate is in the report's table
        assert f"| qs | {p['step']} | {p['tokens_seen']} | {p['winrate']['winrate']:.3f} [" in md
    for png in ("rewards_accuracies.png", "winrate.png", "forgetting.png", "loss_margins.png", "winrate_curve.png",
                "downstream_curve.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in printed and "dpo" in printed and acc in printed


def _same_adapter_weights(snapshot, checkpoint):
    """The snapshot's saved adapter equals the trainable weights of the checkpoint at the same step."""
    from safetensors.torch import load_file

    saved = load_file(snapshot / "adapter_model.safetensors")
    trained = load_file(checkpoint / "trainable.safetensors")
    assert len(saved) == len(trained) > 0
    by_suffix = {k.split("layers.", 1)[1].replace(".default", ""): v for k, v in trained.items()}
    for k, v in saved.items():
        assert (v == by_suffix[k.split("layers.", 1)[1]]).all(), k
