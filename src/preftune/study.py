"""``preftune study``: the Cerebras DPO study's experiments, one sweep recipe each in ``configs/study/``,
planned offline (stages shared and trained, steps, pairs and evaluations of each run) or run in turn,
then one report whose first table sets the study's findings beside ours (report/findings.py).
``--embedded`` runs the same recipes through an overlay (``configs/study/embedded.yaml``) that swaps the
Hub models and data for the embedded ones, shrinks every size, and trains the offline judge (a reward
model) that judges every win-rate in place of the study's GPT-4."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import yaml

from preftune.config import Config, ConfigError, DataConfig, apply_overrides, load_raw, merge, to_dict
from preftune.config.validate import config_from_dict
from preftune.data.sources import read_records
from preftune.data.stage import stage_data_config, steps_per_epoch, total_steps
from preftune.errors import PreftuneError
from preftune.eval.heldout import looks_like_dataset
from preftune.eval.judges import preflight as preflight_judge
from preftune.eval.prompts import HH_CATEGORIES, draws_hh_categories
from preftune.eval.tasks import TASK_SETS
from preftune.paths import StudyDir
from preftune.report.findings import write_findings
from preftune.sweep import PlannedRun, plan, plan_note, run_sweep, sft_note

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "study"
"""The shipped recipes (a source checkout's ``configs/study/``)."""

EMBEDDED_OVERLAY = "embedded.yaml"
"""The overlay of ``--embedded``, beside the recipes."""

CARD_ROWS: dict[tuple[str, str], int] = {
    ("Anthropic/hh-rlhf", "train"): 160_800, ("Anthropic/hh-rlhf", "test"): 8_552,
    ("stanfordnlp/SHP", "train"): 348_718, ("stanfordnlp/SHP", "test"): 18_409,
    ("tatsu-lab/alpaca", "train"): 52_002,
}
"""Rows per split of the study's Hub datasets, from their dataset cards, so that a dry run plans offline."""


# ---------------------------------------------------------------- recipes


def recipes(folder: Path = RECIPES) -> dict[str, Path]:
    """Experiment name (the file's stem) -> recipe, in order; the overlay is not a recipe."""
    if not folder.is_dir():
        raise PreftuneError(f"no study recipes at {folder}: run from a source checkout of preftune "
                            "(its configs/study/) or pass --recipes FOLDER")
    return {p.stem: p for p in sorted(folder.glob("*.yaml")) if p.name != EMBEDDED_OVERLAY}


def select(found: dict[str, Path], only: str | None) -> dict[str, Path]:
    """The experiments ``--only`` names (its file stem, or its letter: ``b``), or all of them."""
    if not only:
        return found
    picked = {n: p for n, p in found.items() if n == only or n.split("_", 1)[0] == only}
    if not picked:
        raise PreftuneError(f"--only {only}: no such experiment; choose one of {', '.join(found)}")
    return picked


def _replace(node: Any, table: dict[str, str]) -> Any:
    """Every string of ``node`` found in ``table`` replaced; a data mapping whose ``source`` is replaced
    gets ``format: auto`` and no ``subset`` (the embedded data has its own layout)."""
    if isinstance(node, dict):
        out = {k: _replace(v, table) for k, v in node.items()}
        if isinstance(node.get("source"), str) and node["source"] in table:
            out["format"] = "auto"
            out.pop("subset", None)
        return out
    if isinstance(node, list):
        return [_replace(v, table) for v in node]
    return table.get(node, node) if isinstance(node, str) else node


def skipped(overlay: dict | None) -> dict[str, str]:
    """Experiment -> why the overlay leaves it out (its ``skip``)."""
    return {n: str(e["skip"]) for n, e in ((overlay or {}).get("experiments") or {}).items()
            if isinstance(e, dict) and e.get("skip")}


def judged_by(overlay: dict) -> dict:
    """What the overlay's ``judge`` block sets in every recipe: the reward-model judge at its output_dir."""
    block = overlay.get("judge")
    if not block:
        return {}
    if not isinstance(block, dict) or not block.get("recipe") or not block.get("output_dir"):
        raise PreftuneError("the overlay's judge: needs recipe (a `preftune rm` config, relative to the overlay) "
                            "and output_dir (where the reward model is trained)")
    return {"eval": {"winrate": {"judge": "reward_model", "judge_model": str(block["output_dir"])}}}


def apply_overlay(raw: dict, overlay: dict, name: str) -> dict:
    """A recipe under an overlay: ``replace`` (names -> their stand-ins, sweep variants included), then
    ``all``, the ``judge`` block's judge and ``experiments.<name>`` merged over it; ``{name}`` in
    ``output_dir`` is the experiment."""
    out = _replace(copy.deepcopy(raw), overlay.get("replace") or {})
    own = {k: v for k, v in ((overlay.get("experiments") or {}).get(name) or {}).items() if k != "skip"}
    for part in (overlay.get("all") or {}, judged_by(overlay), own):
        for key, value in part.items():
            if key == "sweep":
                out["sweep"] = copy.deepcopy(value)  # a sweep block is replaced, not merged
            else:
                merge(out, {key: copy.deepcopy(value)})
    if isinstance(out.get("output_dir"), str):
        out["output_dir"] = out["output_dir"].replace("{name}", name)
    return out


def load_recipe(path: Path, overlay: dict | None = None, overrides: list[str] = ()) -> dict:
    """A recipe, under the overlay when given, then ``key=value`` overrides on its base (a sweep
    variant's own keys still win)."""
    raw = load_raw(path)
    raw = apply_overlay(raw, overlay, path.stem) if overlay else raw
    return apply_overrides(raw, list(overrides))


def load_overlay(folder: Path) -> dict:
    path = folder / EMBEDDED_OVERLAY
    if not path.is_file():
        raise PreftuneError(f"--embedded needs {path} (the overlay that swaps in the embedded model and data)")
    return yaml.safe_load(path.read_text()) or {}


def judge_config(overlay: dict | None, folder: Path) -> Config | None:
    """The overlay's offline judge, or None: its ``judge`` block's ``recipe`` (a ``preftune rm`` config,
    relative to ``folder``) with the block's other keys merged over it."""
    if not (overlay or {}).get("judge"):
        return None
    judged_by(overlay)  # the block's shape
    block = overlay["judge"]
    path = (folder / block["recipe"]).resolve()
    raw = load_raw(path)
    merge(raw, {k: copy.deepcopy(v) for k, v in block.items() if k != "recipe"})
    return config_from_dict(raw, f"{path} (the overlay's judge)")


def train_judge(cfg: Config, echo=print) -> None:
    """Train the judge (a run that finished earlier is kept) and say how well it ranks held-out pairs."""
    from preftune.model import model_folder
    from preftune.train import run_stage

    summary = run_stage(cfg, "rm", cfg.output_dir, model_folder(cfg), resume=True)
    acc = summary.get("eval_accuracy")
    echo(f"study: judge {cfg.output_dir}: {summary['steps']} steps" +
         (f", held-out accuracy {acc:.3f}" if isinstance(acc, (int, float)) else ""))


# ---------------------------------------------------------------- the offline plan


def split_rows(data: DataConfig, split: str) -> tuple[int | None, str]:
    """(rows of one split, where the number comes from): counted for local and embedded data, the
    dataset card's for the study's Hub datasets, unknown (None) otherwise. Nothing is downloaded."""
    if (data.source, split) in CARD_ROWS:
        return CARD_ROWS[(data.source, split)], "card"
    if not (data.source.startswith("embedded:") or Path(data.source).expanduser().exists()):
        return None, "unknown"  # another Hub dataset: a plan never downloads
    try:
        return sum(1 for _ in read_records(data.source, split, data.subset, on_bad=lambda e: None)), "counted"
    except PreftuneError:
        return None, "unknown"


def train_rows(data: DataConfig, seed: int) -> tuple[int | None, str]:
    """Training rows of a stage's data as load_rows keeps them (held-out carved off when the source has
    no test split, then ``max_rows``); filters such as SHP's score ratio can only lower the figure."""
    n, where = split_rows(data, data.split)
    if n is None:
        return None, where
    has_test = bool(data.test_split) and split_rows(data, data.test_split)[0]
    if not has_test and not data.test_source:
        n -= min(max(1, round(data.test_size * n)), n - 1) if data.test_size > 0 and n >= 2 else 0
    return (min(n, data.max_rows) if data.max_rows else n), where


def stage_steps(cfg: Config, stage: str) -> tuple[int | None, int | None, str]:
    """(rows or pairs, optimizer steps, source of the row count) of one stage, by the loop's rules."""
    s = getattr(cfg, stage)
    n, where = train_rows(stage_data_config(cfg, stage), cfg.seed)
    if n is None:
        return None, s.max_steps, where
    per_epoch = steps_per_epoch(math.ceil(n / s.batch_size), s.grad_accum, s.drop_last)
    return n, total_steps(s, per_epoch), where


def evaluations(cfg: Config, dpo_steps: int | None) -> str:
    """What the run evaluates, in words: the models, snapshots, prompts, tasks, corpus and datasets."""
    ev = cfg.eval
    models = ["base"] + [s for s in ("sft", "dpo") if getattr(cfg, s).enabled]
    parts = [f"{len(models)} models ({', '.join(models)})"]
    if ev.curve_every and dpo_steps:
        parts[0] += f" + {math.ceil(dpo_steps / ev.curve_every)} DPO snapshots"
    if ev.rewards:
        parts.append("reward acc on the held-out pairs" + (f" every {cfg.dpo.eval_every} steps" if cfg.dpo.eval_every else ""))
    if ev.winrate.enabled:
        cats = f"{len(HH_CATEGORIES)} x {ev.winrate.per_category} ({', '.join(HH_CATEGORIES)})" \
            if draws_hh_categories(ev.winrate, cfg.data) else f"{ev.winrate.per_category} per category"
        parts.append(f"win-rate ({ev.winrate.judge} judge{', ' + ev.winrate.judge_model if ev.winrate.judge != 'rule' and ev.winrate.judge_model else ''}): {cats} prompts")
    if ev.tasks:
        n = sum(len(TASK_SETS.get(t, (t,))) for t in ev.tasks)
        parts.append(f"{n} downstream task(s)")
    if ev.heldout.enabled:
        h = ev.heldout
        what = f"{h.corpus} {h.split}" if looks_like_dataset(h.corpus) else h.corpus
        parts.append(f"held-out loss on {what} ({h.max_chunks} x {h.chunk_length} tokens)")
    if ev.datasets:
        parts.append("also judged on " + ", ".join(d.name for d in ev.datasets))
    return "; ".join(parts)


def _count(n: int | None, where: str) -> str:
    return "?" if n is None else f"{n:,}" + (" (card)" if where == "card" else "")


def plan_rows(runs: list[PlannedRun]) -> list[dict]:
    """One record per run: its SFT stage (trained, shared or its own, and why), rows and steps of each
    stage, and its evaluations."""
    first_with: dict[str, str] = {}
    out = []
    for r in runs:
        rec: dict[str, Any] = {"run": r.name}
        if r.cfg.sft.enabled:
            note = sft_note(r, runs, first_with, True)
            first_with.setdefault(r.sft_key, r.name)
            n, steps, where = stage_steps(r.cfg, "sft")
            rec["sft"] = (plan_note(note) or "trained") if "sft_shared_with" not in note else plan_note(note)
            rec["sft_rows"], rec["sft_steps"] = ("-", "-") if "sft_shared_with" in note else (_count(n, where), steps)
        dpo_steps = None
        if r.cfg.dpo.enabled:
            n, dpo_steps, where = stage_steps(r.cfg, "dpo")
            rec["dpo_pairs"], rec["dpo_steps"] = _count(n, where), dpo_steps
        rec["evaluations"] = evaluations(r.cfg, dpo_steps)
        out.append(rec)
    return out


def format_experiment(name: str, raw: dict, runs: list[PlannedRun]) -> str:
    rows = plan_rows(runs)
    head = ["run", "SFT stage", "SFT rows", "SFT steps", "DPO pairs", "DPO steps"]
    table = [head] + [[r["run"], r.get("sft", "off"), str(r.get("sft_rows", "-")), str(r.get("sft_steps", "-")),
                       str(r.get("dpo_pairs", "-")), str(r.get("dpo_steps", "-"))] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"== {name}: {len(runs)} run(s), model {raw.get('model')}, into {raw.get('output_dir')}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    trained = len({r.sft_key for r in runs if r.sft_key})
    lines.append(f"  SFT stages trained: {trained}; DPO stages trained: {sum(1 for r in runs if r.cfg.dpo.enabled)}")
    if len({r["evaluations"] for r in rows}) == 1:
        lines.append(f"  evaluations of every run: {rows[0]['evaluations']}")
    else:
        lines += [f"  evaluations of {r['run']}: {r['evaluations']}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- running


def shared_sft_lines(planned: dict[str, list[PlannedRun]]) -> list[str]:
    """The plan's word on SFT across experiments: each SFT stage is trained once, by the first run that
    needs it, for every experiment with the same SFT settings (the study ran its DPO variants from one
    SFT model); a later experiment's "trained here" then finds it finished."""
    users: dict[str, list[str]] = {}
    for name, runs in planned.items():
        for r in runs:
            if r.sft_key and name not in users.setdefault(r.sft_key, []):
                users[r.sft_key].append(name)
    lines = [f"== SFT stages for the whole study: {len(users)}, each trained once and shared"]
    for key, names in users.items():
        first = next(r.name for r in planned[names[0]] if r.sft_key == key)
        lines.append(f"  {key[:8]}: trained by {names[0]}/{first}" +
                     (f", shared with {', '.join(names[1:])}" if len(names) > 1 else ""))
    return lines


def study_root(raws: list[dict]) -> Path:
    """The folder that holds every experiment's sweep: the common parent of their ``output_dir``."""
    parents = {Path(r.get("output_dir") or Config.output_dir).parent for r in raws}
    return parents.pop() if len(parents) == 1 else Path("runs/study")


def preflight_judges(planned: dict[str, list[PlannedRun]]) -> None:
    """Every distinct judge of every experiment answers before anything trains."""
    seen: dict[str, Any] = {}
    for runs in planned.values():
        for r in runs:
            seen.setdefault(json.dumps(to_dict(r.cfg.eval.winrate), sort_keys=True), r.cfg.eval.winrate)
    for w in seen.values():
        preflight_judge(w)


def run_study(folder: Path = RECIPES, only: str | None = None, dry_run: bool = False, embedded: bool = False,
              overlay: dict | None = None, overrides: list[str] = (), echo=print) -> dict:
    """Plan every chosen experiment (printing the plan); unless ``dry_run``, check the judges, run each
    experiment's sweep in turn and write the findings report. Returns ``{experiment: sweep state}`` and,
    when run, ``findings`` (the report's path)."""
    if embedded and overlay is None:
        overlay = load_overlay(folder)
    overlay = overlay if embedded else None
    chosen = select(recipes(folder), only)
    left_out = {n: why for n, why in skipped(overlay).items() if n in chosen}
    for name, why in left_out.items():
        echo(f"== {name}: left out ({why})")
    raws = {name: load_recipe(path, overlay, overrides) for name, path in chosen.items() if name not in left_out}
    planned: dict[str, list[PlannedRun]] = {}
    problems: list[str] = []
    for name, raw in raws.items():
        try:
            planned[name] = plan(raw, str(chosen[name]))
        except ConfigError as e:
            problems += [f"{name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems, "the study's recipes" + (" (--embedded)" if embedded else ""))
    for name, runs in planned.items():
        echo(format_experiment(name, raws[name], runs))
    judge = judge_config(overlay, folder)
    if judge is not None:
        pairs, steps, where = stage_steps(judge, "rm")
        echo(f"== judge: a reward model from {judge.model}, {_count(pairs, where)} pairs, {steps} steps, "
             f"into {judge.output_dir}, trained first; it judges every win-rate")
    root = study_root(list(raws.values()))
    for line in shared_sft_lines(planned):
        echo(line)
    if dry_run:
        echo(f"\nplan only (--dry-run): {len(planned)} experiment(s) into {root}; nothing was trained")
        return {name: {"runs": [r.name for r in runs]} for name, runs in planned.items()}
    if judge is not None:
        train_judge(judge, echo)
    preflight_judges(planned)
    states: dict[str, Any] = {}
    for name, raw in raws.items():
        echo(f"\nstudy: experiment {name}")
        states[name] = run_sweep(raw, source=str(chosen[name]), echo=echo, shared_root=root)
    states["findings"] = str(write_findings(root, StudyDir(root).report_dir, left_out))
    echo(f"study: findings in {states['findings']}")
    return states
