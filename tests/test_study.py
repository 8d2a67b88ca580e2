"""``preftune study``: every shipped recipe loads and plans offline, the plan's figures by the loop's
rules, the findings table on hand-made run folders (one finding agrees, one disagrees, one is not
shown), and (e2e) every experiment end to end on the tiny model through the --embedded overlay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.report.findings import AGREES, DISAGREES, NOT_SHOWN, Finding, findings, write_findings
from preftune.study import RECIPES, load_overlay, recipes

NAMES = list(recipes())


def test_the_study_has_a_recipe_per_experiment():
    assert NAMES == ["a_downstream", "b_precision", "c_forgetting", "d_beta_data", "e_sft_data", "f_training_length"]


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_passes_config_show_and_its_dry_run_offline(name, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", str(RECIPES / f"{name}.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"].startswith("EleutherAI/pythia-")
    assert main(["study", "--only", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"== {name}:" in out and "SFT stages trained:" in out and "nothing was trained" in out
    assert not (tmp_path / "runs").exists()


def test_the_precision_plan_trains_sft_once_and_counts_steps_by_the_loop(capsys, monkeypatch):
    """HH's 160,800 training pairs (its card), 8 a micro-batch, 8 micro-batches a step:
    ceil(160,800 / 8) = 20,100 micro-batches, ceil(20,100 / 8) = 2,513 steps for one epoch."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["study", "--only", "b", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()[0].endswith(("-full", "-lora"))}
    assert "sft trained here for bf16-full, bf16-lora (fp32, lora off)" in row["fp32-full"]
    assert row["fp32-full"].split()[-4:] == ["2513", "160,800", "(card)", "2513"]
    for name in ("bf16-full", "bf16-lora"):
        assert "sft shared with fp32-full" in row[name] and row[name].split()[-3:] == ["160,800", "(card)", "2513"]
    assert "  SFT stages trained: 1; DPO stages trained: 3" in lines
    assert any("win-rate (openai judge, gpt-4): 2 x 256 (helpful, harmless) prompts" in line for line in lines)


def test_the_embedded_plan_trains_its_judge_first_and_every_winrate_uses_it(capsys, monkeypatch, tmp_path):
    """--embedded's overlay trains one reward model before the experiments (96 pairs, 12 steps of 8), and
    sets it as every recipe's judge in place of the study's GPT-4; a judge that is not there stops a run
    before training, naming the setting."""
    from preftune.config import WinrateConfig
    from preftune.eval.judges import JudgeUnavailable, preflight
    from preftune.study import apply_overlay, load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["study", "--embedded", "--only", "b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "== judge: a reward model from embedded:smollm2-135m-instruct, 96 pairs, 12 steps, into " \
           "runs/study-embedded/judge, trained first" in out
    assert "win-rate (reward_model judge, runs/study-embedded/judge)" in out
    overlay = load_overlay(RECIPES)
    raw = load_recipe(RECIPES / "f_training_length.yaml", overlay)
    assert raw["eval"]["winrate"]["judge"] == "reward_model"
    with pytest.raises(Exception, match="judge: needs recipe"):
        apply_overlay({}, {"judge": {"recipe": "x.yaml"}}, "x")
    with pytest.raises(JudgeUnavailable, match="eval.winrate.judge_model: the reward model cannot be loaded"):
        preflight(WinrateConfig(judge="reward_model", judge_model=str(tmp_path / "runs" / "none")))


def test_only_names_an_unknown_experiment(capsys):
    assert main(["study", "--only", "z", "--dry-run"]) != 0
    assert "--only z: no such experiment; choose one of a_downstream" in capsys.readouterr().err


# ---------------------------------------------------------------- findings on hand-made run folders


def _run(root: Path, experiment: str, name: str, config: dict, models: dict) -> None:
    run = root / experiment / "runs" / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "eval" / "eval.json").write_text(json.dumps({"models": models, "comparisons": {}}))


def _wr(w: float, low: float, high: float) -> dict:
    return {"winrate": {"winrate": w, "ci_low": low, "ci_high": high, "n": 512}}


def _forgot(mean: float, low: float, high: float) -> dict:
    return {"heldout": {"bpb": 1.0, "diff_vs_base": {"mean": mean, "low": low, "high": high, "n": 64}}}


def test_findings_agree_disagree_and_not_shown(tmp_path):
    """fp32 0.50 [0.45, 0.55] vs bf16 0.51 [0.46, 0.56]: a difference of -0.01 whose CI (half-width
    1.96 * hypot(0.0255, 0.0255) = 0.071) spans 0 and is narrower than 0.2: agrees (equal).
    Full 0.51 vs LoRA 0.49, same CIs: +0.02 +- 0.071 spans 0: not shown.
    Forgetting: beta 0.05 +0.001 [0.000, 0.002], beta 0.5 +0.010 [0.009, 0.011]: low - high beta =
    -0.009 +- 1.96 * hypot(0.00051, 0.00051) = 0.0014, below 0: the higher beta forgot MORE, disagrees."""
    _run(tmp_path, "b_precision", "fp32-full", {"precision": "fp32", "lora": {"enabled": False}},
         {"dpo": _wr(0.50, 0.45, 0.55)})
    _run(tmp_path, "b_precision", "bf16-full", {"precision": "bf16-mixed", "lora": {"enabled": False}},
         {"dpo": _wr(0.51, 0.46, 0.56)})
    _run(tmp_path, "b_precision", "bf16-lora", {"precision": "bf16-mixed", "lora": {"enabled": True}},
         {"dpo": _wr(0.49, 0.44, 0.54)})
    _run(tmp_path, "c_forgetting", "beta0.05", {"dpo": {"beta": 0.05}}, {"dpo": _forgot(0.001, 0.0, 0.002)})
    _run(tmp_path, "c_forgetting", "beta0.5", {"dpo": {"beta": 0.5}}, {"dpo": _forgot(0.010, 0.009, 0.011)})
    rows = {f.claim: f for f in findings(tmp_path)}
    equal, lora = rows["fp32 and bf16 DPO are about equal"], rows["full fine-tuning is at least as good as LoRA"]
    beta = rows["a higher beta forgets less (held-out loss on pre-training text)"]
    assert equal.verdict == AGREES and equal.ours == "win-rate fp32 - bf16 (independent): -0.010 [-0.081, +0.061]"
    assert lora.verdict == NOT_SHOWN and "the 95% CI spans 0" in lora.reason
    assert lora.ours == "win-rate full - LoRA (independent): +0.020 [-0.051, +0.091]"
    assert beta.verdict == DISAGREES and beta.ours.endswith("difference -0.0090 [-0.0104, -0.0076]")
    down = rows["DPO improves downstream accuracy over the base model"]
    assert down.verdict == NOT_SHOWN and down.reason.startswith("a_downstream: no downstream task scores")

    md = write_findings(tmp_path, tmp_path / "report", {"e_sft_data": "one source"}).read_text()
    table = md.split("## Findings\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0] == "| the study's finding | its number | ours [95% CI] | verdict |" and len(table) == 2 + 9
    assert "| DPO improves downstream accuracy over the base model | about +2% (Table 1) |" in table[2]
    assert any("e_sft_data was not run: one source" in line for line in table)
    assert json.loads((tmp_path / "report" / "findings.json").read_text())[2]["verdict"] == AGREES


def _samples(root: Path, experiment: str, name: str, scores: list[float]) -> None:
    path = root / experiment / "runs" / name / "eval" / "samples-dpo.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "score": s}) + "\n" for i, s in enumerate(scores)))


def test_run_differences_are_paired_over_the_prompts_both_judged(tmp_path):
    """Full 0.70 [0.45, 0.90] vs LoRA 0.50 [0.30, 0.70]: from the two CIs alone, +0.20 spans 0. Their
    samples show the same 40 prompts, where full wins 8 that LoRA lost and is equal on the rest:
    paired, +0.20 with a bootstrap CI above 0, so full >= LoRA agrees."""
    _run(tmp_path, "b_precision", "bf16-full", {"precision": "bf16-mixed", "lora": {"enabled": False}},
         {"dpo": _wr(0.70, 0.45, 0.90)})
    _run(tmp_path, "b_precision", "bf16-lora", {"precision": "bf16-mixed", "lora": {"enabled": True}},
         {"dpo": _wr(0.50, 0.30, 0.70)})
    lora = [1.0] * 20 + [0.0] * 20
    _samples(tmp_path, "b_precision", "bf16-lora", lora)
    _samples(tmp_path, "b_precision", "bf16-full", lora[:20] + [1.0] * 8 + [0.0] * 12)
    row = next(f for f in findings(tmp_path) if f.claim.startswith("full fine-tuning"))
    assert row.ours.startswith("win-rate full - LoRA (paired, n=40): +0.200 [+0.") and row.verdict == AGREES
    _samples(tmp_path, "b_precision", "bf16-full", [None] * 40)  # nothing both judged: the two CIs again
    row = next(f for f in findings(tmp_path) if f.claim.startswith("full fine-tuning"))
    assert row.ours.startswith("win-rate full - LoRA (independent): +0.200 [-0.") and row.verdict == NOT_SHOWN


def _curve(root: Path, accs: dict[int, float], rates: dict[int, tuple[float, float, float]]) -> None:
    run = root / "f_training_length" / "runs" / "m"
    (run / "dpo").mkdir(parents=True)
    (run / "dpo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "eval/rewards/accuracies": a}) + "\n" for s, a in accs.items()))
    (run / "eval" / "curve.json").write_text(json.dumps({"points": [
        {"step": s, **_wr(*r)} for s, r in rates.items()]}))


@pytest.mark.parametrize("rates, verdict, reason", [
    ({6: (0.40, 0.26, 0.55), 12: (0.30, 0.18, 0.45), 18: (0.35, 0.22, 0.50)}, AGREES, "is the best win-rate"),
    ({6: (0.27, 0.16, 0.42), 12: (0.30, 0.18, 0.45), 18: (0.39, 0.26, 0.54)}, NOT_SHOWN, "CIs overlap"),
    ({6: (0.10, 0.05, 0.20), 12: (0.30, 0.18, 0.45), 18: (0.60, 0.50, 0.70)}, DISAGREES, "beyond both CIs"),
])
def test_the_peaks_finding_calls_overlapping_cis_not_shown(tmp_path, rates, verdict, reason):
    """Reward accuracy peaks at step 6 in every case. The win-rate there is the best (agrees), below the
    best with overlapping CIs (not shown: no finding from noise), or below it beyond both CIs (disagrees)."""
    _run(tmp_path, "f_training_length", "m", {}, {"dpo": _wr(0.3, 0.2, 0.4)})
    _curve(tmp_path, {6: 0.9, 12: 0.8, 18: 0.7}, rates)
    row = next(f for f in findings(tmp_path) if f.claim == "the win-rate peaks with the reward accuracy")
    assert row.ours.startswith("m: reward-acc peak at step 6 (win-rate ")
    assert row.verdict == verdict and reason in row.reason


# ---------------------------------------------------------------- every experiment on the tiny model


def _tiny_overlay(model: str) -> dict:
    """The shipped --embedded overlay, with the tiny model in place of the embedded one and every size cut
    to a few steps (the recipes and the code that runs them are the real ones)."""
    overlay = load_overlay(RECIPES)
    overlay["replace"] = {k: (model if v.startswith("embedded:smollm2") else v) for k, v in overlay["replace"].items()}
    overlay["all"].update({
        "data": {"max_rows": 16, "max_eval_rows": 6, "max_length": 64, "max_prompt_length": 32},
        "sft": {**overlay["all"]["sft"], "max_steps": 2, "batch_size": 4},  # one lr for every recipe: one SFT
        "dpo": {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "gradient_checkpointing": False, "eval_every": 1},
        "eval": {"batch_size": 8, "tasks": [], "winrate": {"enabled": True, "categories": "rows",
                                                           "per_category": 1, "max_new_tokens": 4},
                 "heldout": {"chunk_length": 32, "max_chunks": 2}},
    })
    overlay["judge"].update({"model": model, "data": {"max_rows": 8, "max_eval_rows": 4, "max_length": 64,
                                                      "max_prompt_length": 32},
                             "rm": {"max_steps": 2, "batch_size": 4}})
    for exp in ("a_downstream", "f_training_length"):
        overlay["experiments"][exp]["eval"] = {"curve_every": 1}
    return overlay


@pytest.mark.e2e
def test_every_experiment_runs_end_to_end_on_the_tiny_model(tmp_path, monkeypatch, tiny_model_dir):
    from preftune.study import run_study

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    states = run_study(embedded=True, overlay=_tiny_overlay(str(tiny_model_dir)), echo=printed.append)
    root = tmp_path / "runs" / "study-embedded"
    assert sorted(states) == ["a_downstream", "b_precision", "c_forgetting", "d_beta_data", "f_training_length",
                              "findings"]
    for exp in ("a_downstream", "b_precision", "c_forgetting", "d_beta_data", "f_training_length"):
        sweep = json.loads((root / exp / "sweep.json").read_text())
        assert all(r["status"] == "done" for r in sweep["runs"]), exp
    judge = json.loads((root / "judge" / "run.json").read_text())
    assert judge["method"] == "rm" and judge["steps"] == 2 and any("== judge: a reward model" in p for p in printed)
    trained = {exp: [r["result"]["sft_trained_here"] for r in json.loads((root / exp / "sweep.json").read_text())["runs"]]
               for exp in ("a_downstream", "b_precision", "c_forgetting", "d_beta_data", "f_training_length")}
    assert trained == {"a_downstream": [True], "b_precision": [False] * 3, "c_forgetting": [False] * 2,
                       "d_beta_data": [False] * 2, "f_training_length": [False]}  # one SFT for the study
    (shared,) = (root / "shared" / "sft").iterdir()
    assert (root / "b_precision" / "runs" / "bf16-lora" / "sft").resolve() == shared.resolve()
    ev = json.loads((root / "b_precision" / "runs" / "fp32-full" / "eval" / "eval.json").read_text())
    assert ev["config"]["winrate"]["judge"] == "reward_model"
    assert all(m["winrate"]["invalid"] == 0 and m["winrate"]["n"] > 0 for m in ev["models"].values())  # open-ended rows too
    curve = json.loads((root / "f_training_length" / "runs" / "smollm2-135m" / "eval" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 1, 2, 3]
    rows = {f["claim"]: Finding(**f) for f in json.loads((Path(states["findings"]).parent / "findings.json").read_text())}
    assert all(f.verdict in (AGREES, DISAGREES, NOT_SHOWN) for f in rows.values())
    assert rows["fp32 and bf16 DPO are about equal"].ours.startswith("win-rate fp32 - bf16 (paired, n=")
    assert rows["full fine-tuning is at least as good as LoRA"].ours.startswith("win-rate full - LoRA (paired, n=")
    assert rows["a higher beta forgets less (held-out loss on pre-training text)"].ours.startswith("Δ bits/byte vs base: beta 0.05")
    assert "e_sft_data was not run" in rows["the SFT data matters: Alpaca SFT + HH DPO is best"].reason
    peaks = rows["the win-rate peaks with the reward accuracy"]
    assert peaks.ours.startswith("smollm2-135m: reward-acc peak at step ") and peaks.verdict != NOT_SHOWN or \
        "CIs overlap" in peaks.reason
    assert Path(states["findings"]).is_file()


def test_overrides_reach_every_recipe_and_a_bad_one_is_named(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["study", "--only", "c", "--dry-run", "dpo.batch_size=16"]) == 0
    assert "160,800 (card)  1257" in capsys.readouterr().out  # ceil(ceil(160,800 / 16) / 8) = 1,257 steps
    assert main(["study", "--only", "c", "--dry-run", "model=cerebras/btlm-3b-8k-base"]) != 0
    assert "c_forgetting: model: cerebras/btlm-3b-8k-base (BTLM) is refused" in capsys.readouterr().err


def test_split_rows_counts_local_data_and_never_downloads(tmp_path):
    from preftune.config import DataConfig
    from preftune.study import split_rows, train_rows

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("".join('{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                                                        for _ in range(10)))
    assert split_rows(DataConfig(source=str(tmp_path / "d")), "train") == (10, "counted")
    assert train_rows(DataConfig(source=str(tmp_path / "d")), 0) == (9, "counted")  # test_size 0.1 carved off
    assert train_rows(DataConfig(source=str(tmp_path / "d"), max_rows=4), 0) == (4, "counted")
    assert split_rows(DataConfig(source="someone/unknown-dataset"), "train") == (None, "unknown")
    assert split_rows(DataConfig(source="Anthropic/hh-rlhf"), "test") == (8_552, "card")
