"""``preftune sweep CONFIG``: a base config plus a ``sweep:`` block -> named runs (a grid of axes,
or an explicit list of variants), each a full resumable pipeline run in ``SWEEP/runs/<name>/``, run
one after another, then one report over them all. Training, evaluation and the report live elsewhere.

Costs paid once across the runs:
  - SFT: runs whose SFT-relevant config is identical share one SFT stage, trained once in
    ``SWEEP/shared/sft/<hash>/`` and linked as each run's ``sft/`` (``sweep.share_sft: false`` opts out).
    ``precision`` and ``lora`` are DPO-side (the study ran fp32, bf16 and LoRA DPO from one SFT model):
    the shared stage trains with the settings of the first run that needs it, and the plan says so.
  - Reference log-probs: reference.py caches them by model, tokenizer, template, truncation, precision
    and data (not beta or loss); sharing the SFT model is what lets runs hit the same entry.
  - The base model's evaluation: eval/suite.py caches generations, held-out loss and task scores by
    the model's files, so only the first run pays for them.
``SWEEP/sweep.json`` holds the plan and each run's status, and records for every run whether its
reference log-probs were computed or reused and how many new evaluation-cache entries it made.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune import embedded, loss_terms
from preftune.config import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    apply_shorthands,
    load_raw,
    merge,
    nest,
    to_dict,
)
from preftune.config.validate import config_from_dict
from preftune.data.stage import (
    epoch_plan,
    load_stage_data,
    stage_bins,
    stage_data_config,
    steps_per_epoch,
    total_steps,
)
from preftune.errors import PreftuneError
from preftune.eval.judges import preflight as preflight_judge
from preftune.eval.suite import cache_dir
from preftune.files import write_json
from preftune.model import load_tokenizer, resolve_model
from preftune.paths import RunDir, StageDir, SweepDir
from preftune.pipeline import run_pipeline
from preftune.report.report import write_report

log = logging.getLogger("preftune")

OPTIONS: dict[str, str] = {
    "variants": "an explicit list of runs: [{name: NAME, KEY: VALUE, ...}, ...] instead of a grid",
    "share_sft": "share one SFT stage between runs whose SFT-relevant config is identical (default true)",
    "tokens_per_second": "throughput for --dry-run time estimates before any run in the sweep has finished",
}
"""Keys of the ``sweep:`` block that are not axes."""

DEFAULT_TOKENS_PER_SECOND = 50.0
"""Whole-run throughput (trained tokens / wall time of SFT + DPO + evaluation) used for time estimates
until a run of the sweep has finished: roughly the embedded SmolLM2-135M LoRA pipeline on 2 CPU cores."""

SFT_IRRELEVANT = ("dpo", "eval", "report_to", "output_dir", "sweep", "threads", "precision", "lora")
"""Config sections that do not decide which SFT stage a run shares (``data`` too when ``sft.data`` is
set). ``precision`` and ``lora`` are the DPO stage's: variants over them start DPO from one SFT model."""

NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=-]+")


# ---------------------------------------------------------------- expansion


@dataclass
class PlannedRun:
    name: str
    overrides: dict[str, Any]
    cfg: Config
    sft_key: str | None = None
    estimate: dict[str, Any] = field(default_factory=dict)


def _flatten_axes(block: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in block.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten_axes(v, key + ".")
        else:
            out[key] = v
    return out


def _label(key: str, value: Any) -> str:
    """One axis value as a readable name part: ``beta0.1``, ``lora_off``, ``loss_ipo``, ``data_hh``."""
    parts = key.split(".")
    leaf = parts[-2] if parts[-1] in ("enabled", "source") and len(parts) > 1 else parts[-1]
    if isinstance(value, bool):
        return f"{leaf}_{'on' if value else 'off'}"
    if isinstance(value, (int, float)):
        return f"{leaf}{value:g}"
    if isinstance(value, str):
        text = value.rsplit(":", 1)[-1] if ":" in value and "/" not in value else Path(value).stem or value
        return f"{leaf}_{text}"
    if isinstance(value, list):
        return f"{leaf}_" + "+".join(str(v) for v in value)
    if isinstance(value, dict):
        return "-".join(_label(f"{key}.{k}", v) for k, v in _flatten_axes(value).items())
    return f"{leaf}_{value}"


def run_name(overrides: dict[str, Any]) -> str:
    """``{"dpo.beta": 0.1, "lora": False}`` -> ``beta0.1-lora_off``."""
    name = "-".join(_label(k, v) for k, v in overrides.items()) or "base"
    return NAME_CHARS.sub("_", name).strip("._") or "run"


def _grid(axes: dict[str, Any], problems: list[str]) -> list[tuple[str | None, dict]]:
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            problems.append(f"sweep.{key}: an axis needs a non-empty list of values, got {values!r}")
    if problems:
        return []
    keys = list(axes)
    return [(None, dict(zip(keys, combo))) for combo in itertools.product(*(axes[k] for k in keys))]


def _variants(variants: Any, problems: list[str]) -> list[tuple[str | None, dict]]:
    if not isinstance(variants, list) or not variants:
        problems.append(f"sweep.variants: expected a non-empty list of mappings, got {variants!r}")
        return []
    out = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            problems.append(f"sweep.variants[{i}]: expected a mapping of overrides, got {v!r}")
            continue
        v = dict(v)
        name = v.pop("name", None)
        out.append((None if name is None else str(name), _flatten_axes(v)))
    return out


def sweep_block(raw: dict) -> tuple[list[tuple[str | None, dict]], dict[str, Any], list[str]]:
    """``(runs as (name or None, overrides), options, problems)`` from the raw config's ``sweep:``."""
    block = raw.get("sweep")
    if not isinstance(block, dict) or not block:
        return [], {}, ["sweep: no axes or variants; add e.g. `sweep: {dpo.beta: [0.05, 0.1, 0.3]}`"]
    options = {k: block[k] for k in OPTIONS if k in block}
    axes = _flatten_axes({k: v for k, v in block.items() if k not in OPTIONS})
    problems: list[str] = []
    for key in axes:
        if key.split(".")[0] in ("output_dir", "sweep"):
            problems.append(f"sweep.{key}: cannot be swept (each run's folder is SWEEP/runs/<name>)")
    if "variants" in options and axes:
        problems.append(f"sweep: use either axes ({', '.join(axes)}) or variants, not both")
        return [], options, problems
    runs = _variants(options["variants"], problems) if "variants" in options else _grid(axes, problems)
    if not isinstance(options.get("share_sft", True), bool):
        problems.append(f"sweep.share_sft: expected true/false, got {options['share_sft']!r}")
    tps = options.get("tokens_per_second", DEFAULT_TOKENS_PER_SECOND)
    if isinstance(tps, bool) or not isinstance(tps, (int, float)) or tps <= 0:
        problems.append(f"sweep.tokens_per_second: expected a positive number, got {tps!r}")
    return runs, options, problems


def sweep_dir(raw: dict) -> Path:
    return Path(raw.get("output_dir") or Config.output_dir)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n}-{seen[n]}")
    return out


def plan(raw: dict, source: str = "config") -> list[PlannedRun]:
    """Every run of the sweep, each config validated; raise ConfigError with every problem of every
    run at once (a problem shared by several runs is listed once, naming them)."""
    specs, _, problems = sweep_block(raw)
    if problems:
        raise ConfigError(problems, source)
    base = apply_shorthands(copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"}))
    names = [NAME_CHARS.sub("_", n) if n else run_name(o) for n, o in specs]
    explicit = [n for n, _ in specs if n]
    dupes = sorted({n for n in explicit if explicit.count(n) > 1})
    if dupes:
        raise ConfigError([f"sweep.variants: duplicate run name(s) {', '.join(dupes)}"], source)
    root = sweep_dir(raw)
    runs, by_problem = [], {}
    for name, (_, overrides) in zip(_unique(names), specs):
        run_raw = copy.deepcopy(base)
        for k, v in overrides.items():
            merge(run_raw, nest(k, v))
        run_raw["output_dir"] = str(SweepDir(root).run(name).root)
        try:
            cfg = config_from_dict(run_raw, f"{source} (run {name})")
        except ConfigError as e:
            for p in e.problems:
                by_problem.setdefault(p, []).append(name)
            continue
        runs.append(PlannedRun(name, overrides, cfg, sft_key(cfg)))
    if by_problem:
        n = len(specs)
        raise ConfigError([p + (" (every run)" if len(rs) == n else f" (runs: {', '.join(rs)})")
                           for p, rs in by_problem.items()], source)
    return runs


def expand(cfg_raw: dict) -> list[tuple[str, Config]]:
    """``[(run name, validated Config)]`` for the sweep in ``cfg_raw`` (grid or variants)."""
    return [(r.name, r.cfg) for r in plan(cfg_raw)]


def sft_settings(cfg: Config) -> dict:
    """The flattened settings that decide a run's SFT stage (all but ``SFT_IRRELEVANT``). The stage reads
    ``sft.data`` when set, else ``data``: a set ``sft.data`` stands where ``data`` would, so a run that
    names its SFT data and one that takes the same data from ``data`` share their SFT stage."""
    d = to_dict(cfg)
    for k in SFT_IRRELEVANT:
        d.pop(k, None)
    if cfg.sft.data is not None:
        d["data"], d["sft"]["data"] = d["sft"]["data"], None
    return _flatten_axes(d)


def sft_key(cfg: Config) -> str | None:
    """A hash of the settings that decide the SFT stage; None when SFT is disabled.

    Runs with the same key train the same SFT data in the same order with the same settings, so the
    sweep trains it once (with the first such run's precision and LoRA, which are DPO-side)."""
    if not cfg.sft.enabled:
        return None
    return hashlib.sha256(json.dumps(sft_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def sft_difference(cfg: Config, other: Config) -> list[str]:
    """The SFT-deciding keys whose values differ between two runs (for the plan)."""
    a, b = sft_settings(cfg), sft_settings(other)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# ---------------------------------------------------------------- estimates


def _tokenizer(cfg: Config):
    name = cfg.tokenizer or cfg.model
    template = cfg.data.chat_template
    if name == embedded.SMOLLM2:  # the tokenizer alone, without converting the model
        return load_tokenizer(str(embedded.tokenizer_dir()), chat_template=template)
    return load_tokenizer(resolve_model(name, cfg.model_revision if name == cfg.model else None), chat_template=template)


def _item_tokens(item) -> int:
    """Tokens of one item as the loop counts them (prompt once per sequence)."""
    if hasattr(item, "chosen_ids"):
        return 2 * len(item.prompt_ids) + len(item.chosen_ids) + len(item.rejected_ids)
    return len(item.prompt_ids) + len(item.completion_ids)


def stage_tokens(cfg: Config, stage: str, tokenizer, memo: dict) -> int:
    """Estimated training tokens of ``stage`` (one process): the data tokenized once (memoised by
    tokenizer, data settings and seed) and cut into micro-batches as the loop cuts them (packed bins
    included), times the fraction of epochs the steps cover, by the loop's own steps-per-epoch."""
    s: TrainConfig = getattr(cfg, stage)
    data_cfg = stage_data_config(cfg, stage)
    layout = "packed" if getattr(s, "layout", None) == "packed" else "padded"  # auto never packs
    key = json.dumps([cfg.tokenizer or cfg.model, stage, to_dict(data_cfg), cfg.seed], sort_keys=True, default=str)
    if key not in memo:
        memo[key] = load_stage_data(cfg, stage, tokenizer, unpaired=stage == "dpo" and loss_terms.unpaired(cfg.dpo)).train
    items = memo[key]
    n_micro = len(epoch_plan(stage_bins(items, s, layout), len(items), s.batch_size, cfg.seed, 0))
    per_epoch = steps_per_epoch(n_micro, s.grad_accum, s.drop_last)
    epoch_tokens = sum(_item_tokens(i) for i in items)
    if s.drop_last:
        epoch_tokens = epoch_tokens * per_epoch * s.grad_accum / max(n_micro, 1)
    return int(epoch_tokens * total_steps(s, per_epoch) / per_epoch)


def sft_note(r: PlannedRun, runs: list[PlannedRun], first_with: dict[str, str], share_sft: bool) -> dict:
    """What the plan says of a run's SFT stage: shared with an earlier run, trained here for later
    runs (with which precision and LoRA), or its own, naming the keys in which it differs."""
    by_name = {x.name: x for x in runs}
    if share_sft and r.sft_key in first_with:
        return {"sft_shared_with": first_with[r.sft_key]}
    note = {}
    sharers = [x.name for x in runs if x.sft_key == r.sft_key and x is not r] if share_sft else []
    if sharers:
        note["sft_trains_for"] = f"{', '.join(sharers)} ({r.cfg.precision}, lora {'on' if r.cfg.lora.enabled else 'off'})"
    if first_with:
        first = by_name[next(iter(first_with.values()))]
        note["sft_differs"] = f"own SFT: differs from {first.name}'s in {', '.join(sft_difference(r.cfg, first.cfg))}"
    return note


def estimate(runs: list[PlannedRun], share_sft: bool) -> None:
    """Fill each run's ``estimate``: tokens per stage (a shared SFT counts for its first run only)."""
    memo: dict = {}
    tokenizers: dict = {}
    first_with: dict[str, str] = {}
    for r in runs:
        tok_key = r.cfg.tokenizer or r.cfg.model
        if tok_key not in tokenizers:
            tokenizers[tok_key] = _tokenizer(r.cfg)
        tok = tokenizers[tok_key]
        est: dict[str, Any] = {}
        if r.cfg.sft.enabled:
            shared = share_sft and r.sft_key in first_with
            est["sft"] = 0 if shared else stage_tokens(r.cfg, "sft", tok, memo)
            est.update(sft_note(r, runs, first_with, share_sft))
            first_with.setdefault(r.sft_key, r.name)
        if r.cfg.dpo.enabled:
            est["dpo"] = stage_tokens(r.cfg, "dpo", tok, memo)
        est["tokens"] = est.get("sft", 0) + est.get("dpo", 0)
        r.estimate = est


def measured_throughput(root: Path) -> tuple[float, int] | None:
    """(trained tokens per second of wall time, runs measured) over the sweep's finished runs."""
    tokens = seconds = n = 0
    for done in sorted(SweepDir(root).runs_dir.glob("*/done.json")):
        d = json.loads(done.read_text())
        if d.get("trained_tokens") and d.get("wall_s"):
            tokens += d["trained_tokens"]
            seconds += d["wall_s"]
            n += 1
    return (tokens / seconds, n) if seconds else None


# ---------------------------------------------------------------- running


def link_shared_sft(run_dir: Path, root: Path, key: str) -> Path:
    """Make ``run_dir/sft`` a link to the sweep's shared SFT stage ``root/shared/sft/<key>``."""
    shared = SweepDir(root).shared_sft(key).root
    shared.mkdir(parents=True, exist_ok=True)
    link = RunDir(run_dir).stage("sft").root
    run_dir.mkdir(parents=True, exist_ok=True)
    if not link.exists() and not link.is_symlink():
        link.symlink_to(os.path.relpath(shared, run_dir), target_is_directory=True)
    return shared


def eval_cache_counts() -> dict[str, int]:
    """Entries per kind in the evaluation suite's on-disk cache (generations, heldout, tasks)."""
    d = cache_dir()
    return {k.name: len(list(k.glob("*.json"))) for k in sorted(d.iterdir()) if k.is_dir()} if d.is_dir() else {}


def reference_info(run_dir: Path) -> dict:
    p = RunDir(run_dir).stage("dpo").data
    return json.loads(p.read_text()).get("reference", {}) if p.is_file() else {}


def _trained_tokens(run_dir: Path, sft_trained: bool) -> int:
    total = 0
    for stage in ("sft", "dpo") if sft_trained else ("dpo",):
        p = RunDir(run_dir).stage(stage).run
        if p.is_file():
            total += int(json.loads(p.read_text()).get("tokens_seen") or 0)
    return total


def run_one(r: PlannedRun, root: Path, share_sft: bool) -> dict:
    """Run (or resume) one pipeline run (its shared SFT stage under ``root``); write its ``done.json``;
    return its status record."""
    out = Path(r.cfg.output_dir)
    resume = out.is_dir() and any(out.iterdir())  # an interrupted run continues from its checkpoints
    sft_trained = True
    if share_sft and r.sft_key:
        shared = link_shared_sft(out, root, r.sft_key)
        sft_trained = not StageDir(shared).is_finished()
        resume = resume or any(shared.iterdir())  # the pipeline skips (or resumes) the shared SFT stage
    before = eval_cache_counts()
    t0 = time.time()
    result = run_pipeline(r.cfg, resume=resume)
    wall = round(time.time() - t0, 1)
    after = eval_cache_counts()
    done = {"name": r.name, "overrides": r.overrides, "timings": result["timings"], "wall_s": wall,
            "trained_tokens": _trained_tokens(out, sft_trained), "sft_trained_here": sft_trained,
            "reference": reference_info(out),
            "eval_cache_new": {k: after.get(k, 0) - before.get(k, 0) for k in after},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(RunDir(out).done, done)
    return done


def _record(r: PlannedRun, status: str, **extra) -> dict:
    return {"name": r.name, "overrides": r.overrides, "output_dir": r.cfg.output_dir, "sft_key": r.sft_key,
            "estimate": r.estimate, "status": status, **extra}


def _throughput(root: Path, options: dict) -> dict:
    measured = measured_throughput(root)
    if measured:
        return {"value": round(measured[0], 1), "source": f"measured over {measured[1]} finished run(s) of this sweep"}
    if "tokens_per_second" in options:
        return {"value": float(options["tokens_per_second"]), "source": "sweep.tokens_per_second"}
    return {"value": DEFAULT_TOKENS_PER_SECOND, "source": "default constant (preftune.sweep.DEFAULT_TOKENS_PER_SECOND)"}


def format_plan(runs: list[PlannedRun], throughput: dict, root: Path) -> str:
    rows = [("run", "overrides", "status", "est. tokens", "est. time", "notes")]
    total_tokens = total_s = 0.0
    for r in runs:
        done = RunDir(r.cfg.output_dir).done.is_file()
        tokens = r.estimate.get("tokens", 0)
        secs = tokens / throughput["value"]
        if not done:
            total_tokens, total_s = total_tokens + tokens, total_s + secs
        note = plan_note(r.estimate)
        over = ", ".join(f"{k}={v}" for k, v in r.overrides.items())
        rows.append((r.name, over, "done" if done else "to run", f"{tokens:,}", _duration(secs), note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"\n{len(runs)} run(s) in {root}; to run: {total_tokens:,.0f} tokens, about {_duration(total_s)} "
                 f"at {throughput['value']:,.0f} tokens/s ({throughput['source']}; includes evaluation)")
    return "\n".join(lines)


def plan_note(est: dict) -> str:
    """The SFT sharing of one planned run, as the plan prints it."""
    if "sft_shared_with" in est:
        return f"sft shared with {est['sft_shared_with']}"
    parts = [est["sft_differs"]] if "sft_differs" in est else []
    if "sft_trains_for" in est:
        parts.append(f"sft trained here for {est['sft_trains_for']}")
    return "; ".join(parts)


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def run_sweep(raw: dict, dry_run: bool = False, source: str = "config", echo=print,
              shared_root: Path | None = None) -> dict:
    """Plan, (dry-run: print and stop), run every unfinished run one after another, then the report.
    Returns the ``sweep.json`` record. Failed runs are recorded and the others still run; the sweep
    then raises a PreftuneError naming them. ``shared_root`` holds the shared SFT stages in place of the
    sweep's folder (the study shares them across its experiments)."""
    runs = plan(raw, source)
    _, options, _ = sweep_block(raw)
    share = bool(options.get("share_sft", True))
    root = sweep_dir(raw)
    estimate(runs, share)
    throughput = _throughput(root, options)
    echo(format_plan(runs, throughput, root))
    state = {"config": source, "sweep_dir": str(root), "share_sft": share, "tokens_per_second": throughput,
             "runs": [_record(r, "done" if RunDir(r.cfg.output_dir).done.is_file() else "planned")
                      for r in runs]}
    if dry_run:
        return state
    for w in {json.dumps(to_dict(r.cfg.eval.winrate), sort_keys=True): r.cfg.eval.winrate for r in runs}.values():
        preflight_judge(w)  # an unusable LLM judge stops the sweep before any training
    write_json(SweepDir(root).state, state)
    failed = []
    for i, r in enumerate(runs):
        done_path = RunDir(r.cfg.output_dir).done
        if done_path.is_file():
            state["runs"][i] = _record(r, "done", result=json.loads(done_path.read_text()))
            echo(f"sweep: {r.name}: finished earlier, skipped")
            continue
        echo(f"sweep: run {i + 1}/{len(runs)}: {r.name}")
        state["runs"][i]["status"] = "running"
        write_json(SweepDir(root).state, state)
        try:
            state["runs"][i] = _record(r, "done", result=run_one(r, shared_root or root, share))
        except KeyboardInterrupt:
            state["runs"][i]["status"] = "interrupted"
            write_json(SweepDir(root).state, state)
            raise
        except Exception as e:  # keep going: one bad run should not waste the others
            log.exception("sweep: run %s failed", r.name)
            state["runs"][i] = _record(r, "failed", error=f"{type(e).__name__}: {e}")
            failed.append(r.name)
        write_json(SweepDir(root).state, state)
    finished = [Path(r.cfg.output_dir) for r in runs if RunDir(r.cfg.output_dir).done.is_file()]
    if finished:
        state["report"] = str(write_report(finished, SweepDir(root).report_dir))
    state["summary"] = summarize(state)
    write_json(SweepDir(root).state, state)
    echo(state["summary"])
    if failed:
        raise PreftuneError(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)} (see {SweepDir(root).state}); "
                            "fix the cause and run the same command again: finished runs are skipped")
    return state


def summarize(state: dict) -> str:
    """What was shared: reference log-probs computed vs reused, and new base-eval cache entries."""
    results = [r.get("result", {}) for r in state["runs"] if r["status"] == "done"]
    computed = sum(1 for r in results if r.get("reference", {}).get("computed") is True)
    reused = sum(1 for r in results if r.get("reference", {}).get("computed") is False)
    sft_trained = sum(1 for r in results if r.get("sft_trained_here"))
    lines = [f"sweep: {len(results)}/{len(state['runs'])} run(s) done; SFT trained {sft_trained} time(s); "
             f"reference log-probs computed {computed} time(s), reused {reused} time(s)"]
    if state.get("report"):
        lines.append(f"report: {state['report']}")
    return "\n".join(lines)


def load_sweep(path: str | Path, overrides: list[str] = ()) -> dict:
    """The raw sweep config at ``path`` with overrides applied (for tests and notebooks)."""
    return apply_overrides(load_raw(path), list(overrides))
