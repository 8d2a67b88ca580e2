"""The report's inputs: the ``Run`` and ``StageRun`` types and reading them from stage, pipeline and
sweep folders (the layout is paths.py's). Tables live in report.py, figures in plots.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from preftune.errors import PreftuneError
from preftune.paths import STAGES, RunDir, StageDir


@dataclass
class StageRun:
    path: Path
    stage: str
    run: dict
    metrics: list[dict]
    config: dict


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    stages: dict[str, StageRun] = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    curve: dict = field(default_factory=dict)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise PreftuneError(f"{path} is not valid JSON ({e}); was the run interrupted while writing it?") from None


def _yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl lines; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def is_stage_run(p: Path) -> bool:
    s = StageDir(p)
    return s.run.is_file() or s.metrics.is_file()


def is_pipeline_run(p: Path) -> bool:
    return RunDir(p).is_pipeline()


def load_stage(p: Path, stage: str | None = None) -> StageRun:
    s = StageDir(p)
    run = _json(s.run)
    return StageRun(p, run.get("stage", stage or p.name), run, read_metrics(s.metrics), _yaml(s.config))


def load_run(p: Path, name: str | None = None) -> Run:
    """A pipeline run folder, or a single stage run folder (then the only stage)."""
    name = name or p.resolve().name
    d = RunDir(p)
    if d.is_pipeline():
        stages = {s: load_stage(p / s, s) for s in STAGES if is_stage_run(p / s)}
        config = _yaml(d.config) or next((s.config for s in stages.values()), {})
    else:
        stage = load_stage(p)
        config, stages = stage.config, {stage.stage: stage}
    return Run(name, p, config, stages, _json(d.eval_json), _json(d.timings), _json(d.curve_json))


def _find_runs(p: Path, depth: int) -> list[Path]:
    if is_pipeline_run(p) or is_stage_run(p):
        return [p]
    if depth == 0 or not p.is_dir():
        return []
    return [r for child in sorted(p.iterdir()) if child.is_dir() for r in _find_runs(child, depth - 1)]


def discover_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under ``paths`` (a run folder, or a sweep folder holding runs)."""
    runs = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            raise PreftuneError(f"run folder not found: {p}")
        found = _find_runs(p, depth=2)
        if not found:
            raise PreftuneError(
                f"{p} holds no run: expected run.json/metrics.jsonl (a stage run), sft/ dpo/ eval/ (a pipeline "
                "run), or sub-folders that are runs (a sweep)"
            )
        for r in found:
            name = r.resolve().name if r == p else str(r.relative_to(p))
            runs.append(load_run(r, name))
    return runs
