"""The report renders from run folders in the documented layout: pipeline, single stage, and sweep.

The folders are written here by hand in the training loop's and the eval suite's documented output
format (metrics.jsonl, run.json, config.yaml, eval/eval.json, timings.json), because the report must
not depend on a training run to be tested; the figures below are therefore known exactly."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from preftune.commands.evaluation import report as report_command
from preftune.errors import PreftuneError
from preftune.report import report as rp
from preftune.report import runs as report_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(stage: str, steps: int, eval_every: int) -> list[dict]:
    """One line per optimizer step (tokens_seen grows by 1000 a step); eval lines every ``eval_every``."""
    lines = []
    for s in range(1, steps + 1):
        m = {"step": s, "tokens_seen": 1000 * s, "pairs_seen": 4 * s, "lr": 1e-4, "grad_norm": 1.0,
             "loss": 0.7 - 0.01 * s, "step_time": 0.1}
        if stage == "dpo":
            m |= {"rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s, "rewards/accuracies": 0.5 + 0.02 * s,
                  "rewards/margins": 0.02 * s, "logps/chosen": -50.0, "logps/rejected": -60.0}
        if s % eval_every == 0:
            m |= {"eval/loss": 0.69 - 0.005 * s}
            if stage == "dpo":
                # eval accuracy peaks at step 4 (0.75), then falls: the early-stopping point
                acc = {2: 0.6, 4: 0.75, 6: 0.7, 8: 0.65}[s]
                m |= {"eval/rewards/accuracies": acc, "eval/rewards/margins": 0.03 * s,
                      "eval/rewards/accuracies_se": 0.05}
        lines.append(m)
    return lines


def write_stage(folder: Path, stage: str, beta: float, best_step: int | None, steps: int = 8) -> None:
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for m in _metrics(stage, steps, eval_every=2):
            f.write(json.dumps(m) + "\n")
        f.write('{"step": 9, "tokens_')  # a torn last line, as a killed run leaves it
    run = {"stage": stage, "loss": "sigmoid" if stage == "dpo" else "sft", "beta": beta if stage == "dpo" else None,
           "steps": steps, "tokens_seen": 1000 * steps, "best_step": best_step,
           "best_metric": 0.75 if best_step else None, "stopped_early": best_step is not None,
           "early_stopping_metric": "eval/rewards/accuracies", "wall_time_s": 12.5, "base_model": "tiny:"}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "tiny:", "dpo": {"beta": beta}}))
    (folder / "final").mkdir()


def eval_json(winrate: float, bpb: float) -> dict:
    """eval.json as the suite writes it (stats.summarize keys for win-rate)."""
    base = {"heldout": {"nll": 3.2, "ppl": 24.53, "bpb": 1.2345, "n_tokens": 1000, "n_bytes": 4000},
            "winrate": {"winrate": 0.25, "ci_low": 0.1, "ci_high": 0.45, "wins": 4, "ties": 2, "losses": 10,
                        "invalid": 0, "n": 16, "vs": "chosen"},
            "tasks": {"embedded:mc": {"acc": 0.3, "acc_norm": 0.35, "n": 60}}}
    dpo = {"rewards": {"rewards/accuracies": 0.71, "rewards/margins": 0.4, "n": 80, "se": 0.05},
           "winrate": {"winrate": winrate, "ci_low": winrate - 0.1, "ci_high": winrate + 0.1, "wins": 9, "ties": 2,
                       "losses": 5, "invalid": 1, "n": 16, "vs": "chosen", "lc_winrate": 0.55,
                       "by_category": {"helpful": {"winrate": winrate, "ci_low": 0.3, "ci_high": 0.8, "n": 8}}},
           "heldout": {"nll": 3.3, "ppl": 27.11, "bpb": bpb, "n_tokens": 1000, "n_bytes": 4000,
                       "diff_vs_base": {"mean": bpb - 1.2345, "low": bpb - 1.2345 - 0.01, "high": bpb - 1.2345 + 0.01}},
           "tasks": {"embedded:mc": {"acc": 0.4, "acc_norm": 0.45, "n": 60}}}
    return {"models": {"base": base, "dpo": dpo}, "comparisons": {"dpo-base": {"mean": 0.3, "low": 0.1, "high": 0.5}},
            "config": {}}


def write_pipeline(folder: Path, beta: float, data: str, winrate: float, bpb: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"model": "tiny:", "precision": "fp32", "lora": {"enabled": True}, "data": {"source": data},
         "dpo": {"beta": beta, "loss": "sigmoid"}}))
    write_stage(folder / "sft", "sft", beta, None)
    write_stage(folder / "dpo", "dpo", beta, best_step=4)
    (folder / "eval").mkdir()
    (folder / "eval" / "eval.json").write_text(json.dumps(eval_json(winrate, bpb)))
    (folder / "timings.json").write_text(json.dumps({"sft": 31.5, "dpo": 47.25, "eval": 12.0}))
    return folder


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 1000, path


def test_pipeline_report_has_figures_tables_and_numbers(tmp_path):
    run = write_pipeline(tmp_path / "run", beta=0.1, data="embedded:prefs", winrate=0.6875, bpb=1.2511)
    html_path = rp.write_report([run], tmp_path / "out")
    out = tmp_path / "out"
    for name in ("rewards_accuracies.png", "loss_margins.png", "winrate.png", "forgetting.png"):
        assert_png(out / name)
    md = (out / "report.md").read_text()
    page = html_path.read_text()
    # figures: linked from Markdown, embedded in HTML (self-contained: no file references)
    assert md.count("](") == 4 and "![rewards accuracies](rewards_accuracies.png)" in md
    assert page.count("data:image/png;base64,") == 4 and "src='rewards_accuracies.png'" not in page
    for text in (md, page):
        assert "0.688 [0.59, 0.79]" in text  # dpo win-rate with its CI
        assert "0.710 ± 0.050" in text  # reward accuracy ± se
        assert "1.2511" in text and "+0.0166 [+0.0066, +0.0266]" in text  # bpb and Δ vs base
        assert "0.400 / 0.450 (n=60)" in text  # task acc / acc_norm
        assert "31.5" in text and "47.2" in text  # stage timings
        assert "0.7500" in text  # best_metric from run.json
        assert "0.300" in text and "[0.100, 0.500]" in text  # paired win-rate difference


def test_best_step_is_marked_at_the_eval_peak(tmp_path):
    run = report_runs.load_run(write_pipeline(tmp_path / "run", 0.1, "embedded:prefs", 0.6, 1.25))
    from preftune.report.plots import best_point

    # best_step = 4 -> tokens_seen 4000, eval accuracy 0.75 there
    assert best_point(run.stages["dpo"], "eval/rewards/accuracies") == (4000, 0.75)
    assert len(run.stages["dpo"].metrics) == 8  # the torn last line is skipped


def test_single_stage_folder(tmp_path):
    write_stage(tmp_path / "dpo_only", "dpo", 0.3, best_step=4)
    rp.write_report([tmp_path / "dpo_only"], tmp_path / "out")
    assert_png(tmp_path / "out" / "rewards_accuracies.png")
    assert not (tmp_path / "out" / "winrate.png").exists()  # no eval.json: no win-rate figure
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| dpo_only | dpo | sigmoid | 0.3 | 8 | 8000 | 4 | 0.7500 | yes | 12.5 |" in md


def test_sweep_tables_hold_every_run(tmp_path):
    sweep = tmp_path / "sweep"
    figures = {("b0.1-hh", 0.1, "hh"): (0.5625, 1.2601), ("b0.5-hh", 0.5, "hh"): (0.4375, 1.2402),
               ("b0.1-shp", 0.1, "shp"): (0.8125, 1.2703)}
    for (name, beta, data), (w, bpb) in figures.items():
        write_pipeline(sweep / name, beta, data, w, bpb)
    (sweep / "cache").mkdir()  # not a run: ignored
    ns = argparse.Namespace(runs=[str(sweep)], out=str(tmp_path / "rep"))
    assert report_command(ns) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Win-rate and downstream accuracy by beta and dataset")[1].split("##")[0]
    assert re.search(r"\| 0\.1 \| 0\.562 \[0\.46, 0\.66\]; acc 0\.400 \| 0\.812 \[0\.71, 0\.91\]; acc 0\.400 \|", section)
    assert re.search(r"\| 0\.5 \| 0\.438 \[0\.34, 0\.54\]; acc 0\.400 \| - \|", section)
    held = md.split("## Held-out loss by beta")[1].split("##")[0].strip().splitlines()
    assert held[2].startswith("| base | base |")  # the base model first, once
    assert [line.split("|")[1].strip() for line in held[3:]] == ["0.1", "0.1", "0.5"]
    for bpb in ("1.2601", "1.2402", "1.2703"):
        assert bpb in held[3] + held[4] + held[5]
    assert_png(tmp_path / "rep" / "winrate.png")


def curve_json(winrates: list[float], best_step: int) -> dict:
    """eval/curve.json as evaluate_curve writes it: steps 0, 4, 8 at 1000 tokens a step."""
    points = []
    for i, w in enumerate(winrates):
        points.append({"step": 4 * i, "tokens_seen": 4000 * i, "pairs_seen": 16 * i, "model": f"m{i}",
                       "winrate": {"winrate": w, "ci_low": w - 0.1, "ci_high": w + 0.1, "n": 16},
                       "checked": {"accuracy": w / 2, "ci_low": 0.0, "ci_high": w, "n": 10, "correct": 1},
                       "tasks": {"embedded:mc": {"acc": 0.3 + 0.05 * i, "n": 60}, "other": {"acc": 0.5, "n": 20}}})
    return {"stage": "dpo", "best_step": best_step, "points": points}


def test_sweep_curves_over_training(tmp_path):
    sweep = tmp_path / "sweep"
    for name, winrates, best in (("b0.1", [0.25, 0.5, 0.4375], 4), ("b0.5", [0.25, 0.3125, 0.6875], 8)):
        run = write_pipeline(sweep / name, 0.1, "hh", winrates[-1], 1.25)
        (run / "eval" / "curve.json").write_text(json.dumps(curve_json(winrates, best)))
    write_pipeline(sweep / "no-curve", 0.3, "hh", 0.5, 1.25)
    rp.write_report([sweep], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = md.split("## Curves over training")[1].split("##")[0].strip().splitlines()[2:]
    assert len(rows) == 6 and not any("no-curve" in r for r in rows)
    assert rows[1] == "| b0.1 | 4 | 4000 | 0.500 [0.40, 0.60] | 0.250 [0.00, 0.50] | 0.425 | best (early-stopping point) |"
    assert rows[5] == "| b0.5 | 8 | 8000 | 0.688 [0.59, 0.79] | 0.344 [0.00, 0.69] | 0.450 | best (early-stopping point) |"
    assert sum("best" in r for r in rows) == 2
    for png in ("winrate_curve.png", "downstream_curve.png"):
        assert_png(tmp_path / "rep" / png)
        assert f"]({png})" in md


def test_no_curve_figures_without_curves(tmp_path):
    run = write_pipeline(tmp_path / "run", 0.1, "hh", 0.5, 1.25)
    rp.write_report([run], tmp_path / "out")
    assert not (tmp_path / "out" / "winrate_curve.png").exists()
    assert "Curves over training" not in (tmp_path / "out" / "report.md").read_text()


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreftuneError, match="holds no run"):
        rp.write_report([tmp_path / "empty"], tmp_path / "out")


def test_reward_kl_frontier_plots_every_model_with_a_kl(tmp_path):
    """Two betas with KL and checked accuracy in eval.json give the frontier figure; runs without KL
    give none."""
    plain = write_pipeline(tmp_path / "plain", beta=0.1, data="embedded:prefs", winrate=0.6, bpb=1.25)
    rp.write_report([plain], tmp_path / "rep0")
    assert not (tmp_path / "rep0" / "reward_kl.png").exists()
    runs = []
    for beta, kl in ((0.1, 0.05), (0.5, 0.01)):
        run = write_pipeline(tmp_path / f"b{beta}", beta=beta, data="embedded:prefs", winrate=0.6, bpb=1.25)
        ev = json.loads((run / "eval" / "eval.json").read_text())
        ev["models"]["dpo"] |= {"kl": {"kl": kl, "tokens": 100, "rows": 8},
                                "checked": {"accuracy": 0.3 + kl, "ci_low": 0.1, "ci_high": 0.5, "n": 20}}
        (run / "eval" / "eval.json").write_text(json.dumps(ev))
        runs.append(run)
    rp.write_report(runs, tmp_path / "rep")
    assert_png(tmp_path / "rep" / "reward_kl.png")
    from preftune.report import plots

    loaded = rp.discover_runs(runs)
    assert plots.reward_kl_plot(loaded, tmp_path / "again.png") == tmp_path / "again.png"
    assert plots.reward_kl_plot([rp.discover_runs([plain])[0]], tmp_path / "none.png") is None


def test_a_model_shared_by_sweep_runs_is_plotted_once(tmp_path):
    """A sweep's shared SFT stage (each run's sft/ links one folder, as `preftune sweep` lays it out;
    its reward figures differ by the run's beta) and the base appear once, under their own names; each
    run's DPO model once per run, and a run with its own SFT stage keeps it."""
    from preftune.report import plots

    shared = tmp_path / "shared" / "sft"
    write_stage(shared, "sft", 0.1, None)
    for beta in (0.1, 0.5, 0.9):
        run = write_pipeline(tmp_path / "runs" / f"b{beta}", beta=beta, data="embedded:prefs", winrate=0.6, bpb=1.25)
        if beta != 0.9:
            shutil.rmtree(run / "sft")
            (run / "sft").symlink_to(Path("..") / ".." / "shared" / "sft")
        ev = json.loads((run / "eval" / "eval.json").read_text())
        models = ev["models"]
        sft = {"rewards": {"rewards/accuracies": 0.6, "rewards/margins": beta, "se": 0.05, "n": 80},
               "heldout": {"bpb": 1.2, "nll": 3.0}, "kl": {"kl": 0.2}, "checked": {"accuracy": 0.3},
               "path": f"runs/b{beta}/sft"}
        ev["models"] = {"base": models["base"], "sft": sft,
                        "dpo": models["dpo"] | {"kl": {"kl": beta}, "checked": {"accuracy": 0.4}}}
        (run / "eval" / "eval.json").write_text(json.dumps(ev))
    loaded = rp.discover_runs([tmp_path / "runs"])
    assert [label for label, _ in plots.model_entries(loaded)] == [
        "base", "sft", "b0.1/dpo", "b0.5/dpo", "b0.9/sft", "b0.9/dpo"]
    assert [label for label, _ in plots._model_rows(loaded, "kl")] == ["sft", "b0.1/dpo", "b0.5/dpo", "b0.9/sft", "b0.9/dpo"]
    assert plots.forgetting_plot(loaded, tmp_path / "f.png") and plots.reward_kl_plot(loaded, tmp_path / "k.png")


def _figures(acc: float | None, winrate: tuple, checked: tuple | None = None) -> dict:
    """One model's ``eval.json`` figures on one dataset: reward acc (se 0.05), (win-rate, CI low,
    CI high) and optionally (checked accuracy, CI low, CI high)."""
    e = {"winrate": dict(zip(("winrate", "ci_low", "ci_high"), winrate)) | {"n": 20, "vs": "chosen"}}
    if acc is not None:
        e["rewards"] = {"rewards/accuracies": acc, "se": 0.05, "n": 40}
    if checked is not None:
        e["checked"] = dict(zip(("accuracy", "ci_low", "ci_high"), checked)) | {"n": 20}
    return e


def test_models_across_evaluation_datasets_table(tmp_path):
    """Two runs of an SFT data x DPO data sweep, each measured on HH and SHP (the study's Tables 5
    and 6): one row per run and model, one column group per evaluation dataset; HH's rows are
    checkable, SHP's are not, so only HH has a checked-accuracy column."""
    sweep = tmp_path / "sweep"
    for name, sft, dpo, shift in (("sft_hh-dpo_shp", "data/hh.jsonl", "data/shp.jsonl", 0.0),
                                  ("sft_shp-dpo_hh", "data/shp.jsonl", "embedded:prefs", 0.25)):
        run = write_pipeline(sweep / name, 0.1, dpo, 0.5, 1.25)
        config = yaml.safe_load((run / "config.yaml").read_text()) | {"sft": {"data": {"source": sft}}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        ev = json.loads((run / "eval" / "eval.json").read_text())
        ev["datasets"] = {
            "hh": {"base": _figures(None, (0.25, 0.1, 0.4), (0.25, 0.05, 0.5)),
                   "sft": _figures(0.5 + shift, (0.375, 0.2, 0.55), (0.5, 0.3, 0.7)),
                   "dpo": _figures(0.625 + shift, (0.5, 0.3, 0.7), (0.75, 0.55, 0.9))},
            "shp": {"base": _figures(None, (0.125, 0.05, 0.3)), "sft": _figures(0.75, (0.25 + shift, 0.1, 0.6)),
                    "dpo": _figures(0.875, (0.625, 0.45, 0.8))}}
        (run / "eval" / "eval.json").write_text(json.dumps(ev))
    rp.write_report([sweep], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    lines = md.split("## Models across evaluation datasets")[1].split("\n## ")[0].strip().splitlines()
    assert lines[0] == ("| run | model | trained on | hh: reward acc (± se) | hh: win-rate [95% CI] | "
                        "hh: checked acc [95% CI] | shp: reward acc (± se) | shp: win-rate [95% CI] |")
    assert lines[2:] == [
        "| sft_hh-dpo_shp | base | - | - | 0.250 [0.10, 0.40] | 0.250 [0.05, 0.50] | - | 0.125 [0.05, 0.30] |",
        "| sft_hh-dpo_shp | sft | hh | 0.500 ± 0.050 | 0.375 [0.20, 0.55] | 0.500 [0.30, 0.70] | 0.750 ± 0.050 | "
        "0.250 [0.10, 0.60] |",
        "| sft_hh-dpo_shp | dpo | hh → shp | 0.625 ± 0.050 | 0.500 [0.30, 0.70] | 0.750 [0.55, 0.90] | 0.875 ± 0.050 | "
        "0.625 [0.45, 0.80] |",
        "| sft_shp-dpo_hh | base | - | - | 0.250 [0.10, 0.40] | 0.250 [0.05, 0.50] | - | 0.125 [0.05, 0.30] |",
        "| sft_shp-dpo_hh | sft | shp | 0.750 ± 0.050 | 0.375 [0.20, 0.55] | 0.500 [0.30, 0.70] | 0.750 ± 0.050 | "
        "0.500 [0.10, 0.60] |",
        "| sft_shp-dpo_hh | dpo | shp → embedded:prefs | 0.875 ± 0.050 | 0.500 [0.30, 0.70] | 0.750 [0.55, 0.90] | "
        "0.875 ± 0.050 | 0.625 [0.45, 0.80] |"]
    assert "<th>hh: checked acc [95% CI]</th>" in (tmp_path / "rep" / "report.html").read_text()


def test_no_cross_dataset_table_without_eval_datasets(tmp_path):
    run = write_pipeline(tmp_path / "run", 0.1, "hh", 0.5, 1.25)
    rp.write_report([run], tmp_path / "out")
    assert "Models across evaluation datasets" not in (tmp_path / "out" / "report.md").read_text()
