"""Curves over training (the study's Figures 3 and 4): the preference stage's starting model (step 0),
its snapshots (``snapshots/step-N``, saved every ``eval.curve_every`` steps) and its final model,
each evaluated with the suite's win-rate, checked accuracy and downstream tasks, written to
``eval/curve.json`` as points against tokens seen. The report draws them; the reward-accuracy curve
comes from the training loop's own held-out evaluations in ``metrics.jsonl``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from preftune.config import Config
from preftune.errors import PreftuneError
from preftune.eval.suite import evaluate_models
from preftune.files import write_json
from preftune.paths import EvalDir, StageDir

CURVE_SECTIONS = ("winrate", "checked", "tasks")


def curve_points(stage_dir: Path, run: dict, start: str) -> list[dict]:
    """``{step, tokens_seen, pairs_seen, model}`` for the starting model, every snapshot and ``final/``
    of the finished stage in ``stage_dir`` (``run`` is its run.json)."""
    points = [{"step": 0, "tokens_seen": 0, "pairs_seen": 0, "model": str(start)}]
    for snap in StageDir(stage_dir).snapshots():
        info = json.loads((snap / "snapshot.json").read_text())
        if info["step"] <= run["steps"]:
            points.append({k: info[k] for k in ("step", "tokens_seen", "pairs_seen")} | {"model": str(snap)})
    if run["steps"] > points[-1]["step"]:
        points.append({"step": run["steps"], "tokens_seen": run["tokens_seen"], "pairs_seen": run["pairs_seen"],
                       "model": str(StageDir(stage_dir).final)})
    return points


def evaluate_curve(cfg: Config, stage_dir: str | Path, out_dir: str | Path, start: str) -> dict:
    """Evaluate every curve point of the stage in ``stage_dir`` (which started from ``start``) and
    write ``out_dir/curve.json``; per-point samples go to ``out_dir/curve/``. Results are cached like
    every evaluation, so an unchanged point is never generated or judged twice."""
    stage_dir, out = Path(stage_dir), Path(out_dir)
    run_file = StageDir(stage_dir).run
    if not run_file.is_file():
        raise PreftuneError(f"{stage_dir} has no run.json: curves need a finished preference stage")
    run = json.loads(run_file.read_text())
    points = curve_points(stage_dir, run, start)
    sub = copy.deepcopy(cfg)
    sub.eval.rewards = False  # the reward-accuracy curve is the loop's own (metrics.jsonl)
    sub.eval.heldout.enabled = False
    sub.eval.datasets = []  # curves follow the run's own data; eval.datasets are measured on the final models
    results = evaluate_models(sub, {f"step-{p['step']}": p["model"] for p in points}, EvalDir(out).curve_samples)
    for p in points:
        entry = results["models"][f"step-{p['step']}"]
        p.update({k: entry[k] for k in CURVE_SECTIONS if k in entry})
    curve = {"stage": run.get("stage", "dpo"), "best_step": run.get("best_step"),
             "early_stopping_metric": run.get("early_stopping_metric"), "stopped_early": run.get("stopped_early"),
             "points": points, "skipped": results.get("skipped", {})}
    write_json(EvalDir(out).curve_json, curve)
    return curve
