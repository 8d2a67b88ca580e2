"""The run-folder layout, in one place: what a stage run, a pipeline run and a sweep hold, and where.
Every module that reads or writes a run folder asks here; nothing here reads or writes files (an
``output_dir`` pattern looks at which folders exist).

    stage run     config.yaml  versions.json  data.json  preflight.json  metrics.jsonl  run.json
                  final/  best/  snapshots/step-N/  checkpoints/step-N/
    pipeline run  config.yaml  timings.json  done.json (in a sweep)  sft/  dpo/ (stage runs)
                  sft/merged/  eval/eval.json  eval/curve.json  report/  rounds/round-K/
    round         samples.jsonl  pairs.jsonl  heldout.jsonl  start/  dpo/ (a stage run)  round.json
    bon           samples.jsonl  sft.jsonl  pairs.jsonl  summary.json (a pipeline run's bon/, or `preftune bon`'s)
    sweep         sweep.json  runs/<name>/ (pipeline runs)  shared/sft/<key>/  report/
    study         its experiments' sweeps  report/ (the findings)
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("sft", "dpo")
"""Stage folders of a pipeline run, in training order."""

OUTPUT_DIR_FIELDS = re.compile(r"\{(name|time|n)\}")
"""An ``output_dir`` pattern's fields: ``{name}`` the config file's name without its extension, ``{time}``
the start time (UTC, ``20261207-204133``), ``{n}`` a counter (1, 2, ... the first folder not there)."""


def output_dir_for(pattern: str, name: str, new: bool = True, now: float | None = None) -> str:
    """The folder an ``output_dir`` pattern names: for a new run its own folder; for one that goes on
    (``--resume``, evaluation) the newest existing folder it matches (the new one when none does). A
    plain ``output_dir`` is itself."""
    if not OUTPUT_DIR_FIELDS.search(pattern):
        return pattern
    named = pattern.replace("{name}", name)
    if not new:
        found = [p for p in glob.glob(OUTPUT_DIR_FIELDS.sub("*", glob.escape(named))) if os.path.isdir(p)]
        if found:
            return max(found, key=os.path.getmtime)
    out = named.replace("{time}", time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)))
    n = 1
    while "{n}" in out and os.path.exists(out.replace("{n}", str(n))):
        n += 1
    return out.replace("{n}", str(n))


_STEP = re.compile(r"step-(\d+)")


def _steps(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := _STEP.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class Folder:
    """A folder of the layout, named by its ``root`` (a str or a Path)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class StageDir(Folder):
    """One training stage's folder (``run_stage``'s ``out_dir``)."""

    config = property(lambda self: self.root / "config.yaml")
    versions = property(lambda self: self.root / "versions.json")
    data = property(lambda self: self.root / "data.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    run = property(lambda self: self.root / "run.json")
    preflight = property(lambda self: self.root / "preflight.json")
    final = property(lambda self: self.root / "final")
    best = property(lambda self: self.root / "best")
    snapshots_dir = property(lambda self: self.root / "snapshots")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")

    def is_finished(self) -> bool:
        return self.run.is_file()

    def snapshot(self, step: int) -> Path:
        return self.snapshots_dir / f"step-{step}"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    def snapshots(self) -> list[Path]:
        """``snapshots/step-N`` model folders (``eval.curve_every``), in step order."""
        return _steps(self.snapshots_dir)

    def checkpoints(self) -> list[Path]:
        """``checkpoints/step-N`` resume folders, oldest first."""
        return _steps(self.checkpoints_dir)

    def model(self) -> Path | None:
        """The stage's model to use: ``best/`` when kept, else ``final/``, else None (unfinished)."""
        return next((p for p in (self.best, self.final) if p.is_dir()), None)


@dataclass(frozen=True)
class EvalDir(Folder):
    """A folder the evaluation writes into (a pipeline run's ``eval/``): results, curve, samples."""

    eval_json = property(lambda self: self.root / "eval.json")
    curve_json = property(lambda self: self.root / "curve.json")
    curve_samples = property(lambda self: self.root / "curve")

    def samples(self, model: str, dataset: str | None = None) -> Path:
        """One model's per-prompt generations, verdicts and scores (on an ``eval.datasets`` entry's rows)."""
        return (self.root / "datasets" / dataset if dataset else self.root) / f"samples-{model}.jsonl"


@dataclass(frozen=True)
class RoundDir(Folder):
    """One on-policy round's folder (rounds.py): what it sampled and paired, and its preference stage."""

    samples = property(lambda self: self.root / "samples.jsonl")
    pairs = property(lambda self: self.root / "pairs.jsonl")
    heldout = property(lambda self: self.root / "heldout.jsonl")
    start = property(lambda self: self.root / "start")
    stage = property(lambda self: StageDir(self.root / "dpo"))
    record = property(lambda self: self.root / "round.json")

    def is_finished(self) -> bool:
        """``round.json`` is written last, so a round with it is finished."""
        return self.record.is_file()


@dataclass(frozen=True)
class BonDir(Folder):
    """A best-of-n folder (bon.py): every sample with its reward, the best as SFT rows, best-vs-worst pairs."""

    samples = property(lambda self: self.root / "samples.jsonl")
    sft = property(lambda self: self.root / "sft.jsonl")
    pairs = property(lambda self: self.root / "pairs.jsonl")
    summary = property(lambda self: self.root / "summary.json")


@dataclass(frozen=True)
class RunDir(Folder):
    """A pipeline run's folder (``cfg.output_dir``): stage runs plus evaluation and report."""


    config = property(lambda self: self.root / "config.yaml")
    timings = property(lambda self: self.root / "timings.json")
    done = property(lambda self: self.root / "done.json")
    eval_dir = property(lambda self: self.root / "eval")
    eval_json = property(lambda self: EvalDir(self.eval_dir).eval_json)
    curve_json = property(lambda self: EvalDir(self.eval_dir).curve_json)
    report_dir = property(lambda self: self.root / "report")
    merged_sft = property(lambda self: self.root / "sft" / "merged")
    rounds_dir = property(lambda self: self.root / "rounds")
    bon = property(lambda self: BonDir(self.root / "bon"))

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name)

    def round(self, k: int) -> RoundDir:
        """On-policy round ``k``'s folder, ``rounds/round-K`` (rounds.py)."""
        return RoundDir(self.rounds_dir / f"round-{k}")

    def finished_stages(self) -> list[StageDir]:
        return [s for s in map(self.stage, STAGES) if s.is_finished()]

    def is_pipeline(self) -> bool:
        return any(s.is_finished() or s.metrics.is_file() for s in map(self.stage, STAGES)) or self.eval_json.is_file()


@dataclass(frozen=True)
class SweepDir(Folder):
    """A sweep's folder: one pipeline run per variant, a shared SFT stage per SFT key, one report."""


    state = property(lambda self: self.root / "sweep.json")
    runs_dir = property(lambda self: self.root / "runs")
    report_dir = property(lambda self: self.root / "report")

    def run(self, name: str) -> RunDir:
        return RunDir(self.runs_dir / name)

    def shared_sft(self, key: str) -> StageDir:
        return StageDir(self.root / "shared" / "sft" / key)


@dataclass(frozen=True)
class StudyDir(Folder):
    """The study's folder (study.py): its experiments' sweeps and the findings report."""

    report_dir = property(lambda self: self.root / "report")
