"""The study's findings beside ours: one row per finding of the Cerebras DPO study (its claim, its number
where the text gives one, our figure with its 95% CI, and a verdict), read from the run folders of
``preftune study``'s experiments. Running the experiments lives in study.py; tables in table.py."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preftune.eval.stats import Z95, paired_bootstrap
from preftune.eval.tasks import mean_accuracy
from preftune.files import write_json
from preftune.paths import EvalDir, RunDir, SweepDir
from preftune.report.runs import Run, load_run
from preftune.report.table import markdown_table

AGREES, DISAGREES, NOT_SHOWN = "agrees", "disagrees", "not shown at this scale"


@dataclass
class Finding:
    claim: str
    """The study's claim, in our words."""
    study: str
    """Its number where the text gives one, else ``-``."""
    ours: str = "-"
    """Our figure with its 95% CI."""
    verdict: str = NOT_SHOWN
    reason: str = ""


Estimate = tuple[float, float, float]
"""(value, 95% CI low, high)."""


# ---------------------------------------------------------------- reading the experiments


def experiment_runs(root: Path, experiment: str) -> dict[str, Run]:
    """The finished runs (those with an ``eval.json``) of one experiment's sweep folder, by name."""
    runs_dir = SweepDir(Path(root) / experiment).runs_dir
    if not runs_dir.is_dir():
        return {}
    runs = {p.name: load_run(p) for p in sorted(runs_dir.iterdir()) if p.is_dir()}
    return {n: r for n, r in runs.items() if r.eval.get("models")}


def _model(run: Run, model: str, dataset: str | None = None) -> dict:
    if dataset:
        return run.eval.get("datasets", {}).get(dataset, {}).get(model, {})
    return run.eval.get("models", {}).get(model, {})


def winrate(entry: dict) -> Estimate | None:
    """The win-rate and its Wilson CI; None when nothing was judged (no valid verdict: a NaN rate)."""
    w = entry.get("winrate") or {}
    rate = w.get("winrate")
    if not isinstance(rate, (int, float)) or not math.isfinite(rate) or w.get("ci_low") is None:
        return None
    return rate, w["ci_low"], w["ci_high"]


def task_mean(entry: dict) -> Estimate | None:
    """Mean accuracy over the tasks, with a normal 95% CI from each task's binomial standard error."""
    tasks = {k: t for k, t in (entry.get("tasks") or {}).items() if isinstance(t, dict) and t.get("n")}
    mean = mean_accuracy(tasks)
    if mean is None:
        return None
    se = math.sqrt(sum(t["acc"] * (1 - t["acc"]) / t["n"] for t in tasks.values())) / len(tasks)
    return mean, mean - Z95 * se, mean + Z95 * se


def forgetting(entry: dict) -> Estimate | None:
    d = (entry.get("heldout") or {}).get("diff_vs_base")
    return (d["mean"], d["low"], d["high"]) if d else None


def difference(a: Estimate, b: Estimate) -> Estimate:
    """a - b for two independent estimates, with the normal CI from their own CIs' half-widths."""
    se = math.hypot((a[2] - a[1]) / (2 * Z95), (b[2] - b[1]) / (2 * Z95))
    d = a[0] - b[0]
    return d, d - Z95 * se, d + Z95 * se


def _scores(run: Run, model: str, dataset: str | None) -> dict[str, float | None]:
    """Prompt -> the judged score of one model of a run (its per-prompt samples file), or {} without one."""
    path = EvalDir(RunDir(run.path).eval_dir).samples(model, dataset)
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {json.dumps(r["prompt"], sort_keys=True): r.get("score") for r in rows}


def between(a: Run, b: Run, ea: Estimate, eb: Estimate, model: str = "dpo",
            dataset: str | None = None) -> tuple[Estimate, str]:
    """The win-rate of ``a``'s model minus ``b``'s, and how it was taken: paired over the prompts both
    runs judged (their held-out prompts against the same chosen responses, so each prompt's difficulty
    cancels), or from the two rates' own CIs when a run has no per-prompt samples."""
    sa, sb = _scores(a, model, dataset), _scores(b, model, dataset)
    keys = [k for k in sa if k in sb and sa[k] is not None and sb[k] is not None]
    if keys:
        mean, low, high = paired_bootstrap([sa[k] for k in keys], [sb[k] for k in keys])
        return (mean, low, high), f"paired, n={len(keys)}"
    return difference(ea, eb), "independent"


def show(e: Estimate, signed: bool = True, digits: int = 3) -> str:
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(e[0])} [{f.format(e[1])}, {f.format(e[2])}]"


def by_sign(e: Estimate, what: str) -> tuple[str, str]:
    """Verdict of a claim that ``e`` is positive: its CI above 0, below 0, or spanning 0."""
    if e[1] > 0:
        return AGREES, ""
    if e[2] < 0:
        return DISAGREES, f"{what} is below 0 beyond its 95% CI"
    return NOT_SHOWN, f"{what}: the 95% CI spans 0 (too few prompts or too short a training to tell)"


def _missing(experiment: str, what: str) -> tuple[str, str]:
    return NOT_SHOWN, f"{experiment}: {what} (run `preftune study --only {experiment}`)"


# ---------------------------------------------------------------- one function per finding


def dpo_downstream(root: Path, f: Finding) -> None:
    runs = experiment_runs(root, "a_downstream")
    run = next(iter(runs.values()), None)
    base, dpo = (task_mean(_model(run, m)) for m in ("base", "dpo")) if run else (None, None)
    if not (base and dpo):
        skipped = (run.eval.get("skipped") or {}).get("tasks") if run else None
        f.verdict, f.reason = _missing("a_downstream", f"no downstream task scores{f' ({skipped})' if skipped else ''}")
        return
    d = difference(dpo, base)
    f.ours = f"DPO - base, mean task acc: {show(d)}"
    f.verdict, f.reason = by_sign(d, "DPO - base")


def dpo_winrate(root: Path, f: Finding) -> None:
    for experiment in ("b_precision", "a_downstream", "f_training_length"):
        for run in experiment_runs(root, experiment).values():
            c = run.eval.get("comparisons", {}).get("dpo-sft")
            if c and c.get("low") is not None:
                d = (c["mean"], c["low"], c["high"])
                f.ours = f"{experiment}/{run.name}: win-rate DPO - SFT (paired, n={c.get('n')}): {show(d)}"
                f.verdict, f.reason = by_sign(d, "DPO - SFT")
                return
    f.verdict, f.reason = _missing("b_precision", "no paired win-rate of DPO against SFT")


def _variant(runs: dict[str, Run], precision: str, lora: bool) -> Run | None:
    for run in runs.values():
        c = run.config
        if str(c.get("precision", "")).startswith(precision) and bool((c.get("lora") or {}).get("enabled")) == lora:
            return run
    return None


def _precision_pair(f: Finding, first: Run | None, second: Run | None, need: str) -> tuple[Estimate, str] | None:
    """``first``'s DPO win-rate minus ``second``'s (:func:`between`); None, with ``f`` marked as wanting
    ``need``, when either b_precision run or its win-rate is missing."""
    a, b = (winrate(_model(r, "dpo")) if r else None for r in (first, second))
    if not (a and b):
        f.verdict, f.reason = _missing("b_precision", need)
        return None
    return between(first, second, a, b)


def precision_equal(root: Path, f: Finding) -> None:
    runs = experiment_runs(root, "b_precision")
    pair = _precision_pair(f, _variant(runs, "fp32", False), _variant(runs, "bf16", False),
                           "needs the fp32-full and bf16-full win-rates")
    if pair is None:
        return
    d, how = pair
    f.ours = f"win-rate fp32 - bf16 ({how}): {show(d)}"
    if d[1] > 0 or d[2] < 0:
        f.verdict, f.reason = DISAGREES, "fp32 and bf16 differ beyond the 95% CI"
    elif d[2] - d[1] > 0.2:
        f.verdict, f.reason = NOT_SHOWN, "the CI spans 0 but is wider than 0.2: too few prompts to call them equal"
    else:
        f.verdict, f.reason = AGREES, "no difference within the 95% CI"


def full_vs_lora(root: Path, f: Finding) -> None:
    runs = experiment_runs(root, "b_precision")
    pair = _precision_pair(f, _variant(runs, "bf16", False), _variant(runs, "bf16", True),
                           "needs the bf16-full and bf16-lora win-rates")
    if pair is None:
        return
    d, how = pair
    f.ours = f"win-rate full - LoRA ({how}): {show(d)}"
    f.verdict, f.reason = by_sign(d, "full - LoRA")


def _beta(run: Run) -> float | None:
    return (run.config.get("dpo") or {}).get("beta")


def beta_forgetting(root: Path, f: Finding) -> None:
    pts = sorted((_beta(r), forgetting(_model(r, "dpo"))) for r in experiment_runs(root, "c_forgetting").values())
    pts = [(b, e) for b, e in pts if b is not None and e]
    if len(pts) < 2:
        f.verdict, f.reason = _missing("c_forgetting", "needs the held-out loss of two betas or more")
        return
    (lo_b, lo), (hi_b, hi) = pts[0], pts[-1]
    d = difference(lo, hi)
    f.ours = (f"Δ bits/byte vs base: beta {lo_b:g} {show(lo, digits=4)}, beta {hi_b:g} {show(hi, digits=4)}; "
              f"difference {show(d, digits=4)}")
    f.verdict, f.reason = by_sign(d, f"forgetting at beta {lo_b:g} - at beta {hi_b:g}")


def small_beta_chat(root: Path, f: Finding) -> None:
    runs = [r for r in experiment_runs(root, "d_beta_data").values()
            if "hh" in str((r.config.get("data") or {}).get("source", "")).lower() or r.name.startswith("hh")]
    pts = [(_beta(r), winrate(_model(r, "dpo")), r) for r in runs]
    small = [p for p in pts if p[0] is not None and p[1] and p[0] < 0.1]
    large = [p for p in pts if p[0] is not None and p[1] and p[0] >= 0.1]
    if not (small and large):
        f.verdict, f.reason = _missing("d_beta_data", "needs HH win-rates at betas below and at or above 0.1")
        return
    (sb, s, s_run), (lb, big, l_run) = max(small, key=lambda p: p[1][0]), max(large, key=lambda p: p[1][0])
    d, how = between(s_run, l_run, s, big)
    f.ours = f"HH win-rate, best beta < 0.1 ({sb:g}) - best beta >= 0.1 ({lb:g}) ({how}): {show(d)}"
    f.verdict, f.reason = by_sign(d, "the difference")


def _dataset_winrate(runs: dict[str, Run], name: str, dataset: str) -> Estimate | None:
    run = runs.get(name)
    return winrate(_model(run, "dpo", dataset)) if run else None


def hh_generalises(root: Path, f: Finding) -> None:
    runs = experiment_runs(root, "e_sft_data")
    hh, shp = _dataset_winrate(runs, "sft_hh-dpo_hh", "shp"), _dataset_winrate(runs, "sft_hh-dpo_shp", "shp")
    if not (hh and shp):
        f.verdict, f.reason = _missing("e_sft_data", "needs the SHP win-rates of DPO on HH and DPO on SHP")
        return
    d, how = between(runs["sft_hh-dpo_hh"], runs["sft_hh-dpo_shp"], hh, shp, dataset="shp")
    f.ours = f"SHP win-rate, DPO on HH - DPO on SHP ({how}): {show(d)}"
    f.verdict, f.reason = by_sign(d, "DPO on HH - DPO on SHP")


def sft_data_matters(root: Path, f: Finding) -> None:
    runs = experiment_runs(root, "e_sft_data")
    best = _dataset_winrate(runs, "sft_alpaca-dpo_hh", "hh")
    others = [(n, e) for n in runs if n != "sft_alpaca-dpo_hh" and (e := _dataset_winrate(runs, n, "hh"))]
    if not (best and others):
        f.verdict, f.reason = _missing("e_sft_data", "needs the HH win-rates of Alpaca-SFT + HH-DPO and the others")
        return
    name, other = max(others, key=lambda p: p[1][0])
    d, how = between(runs["sft_alpaca-dpo_hh"], runs[name], best, other, dataset="hh")
    f.ours = f"HH win-rate, SFT Alpaca + DPO HH - the best other ({name}) ({how}): {show(d)}"
    f.verdict, f.reason = by_sign(d, "the difference")


def peaks_together(root: Path, f: Finding) -> None:
    for run in experiment_runs(root, "f_training_length").values():
        points = [p for p in run.curve.get("points", []) if winrate(p)]
        dpo = run.stages.get("dpo")
        acc = {m["step"]: m["eval/rewards/accuracies"] for m in (dpo.metrics if dpo else [])
               if m.get("eval/rewards/accuracies") is not None and "step" in m}
        shared = [p for p in points if p["step"] in acc]
        if len(shared) < 3:
            continue
        at_acc = max(shared, key=lambda p: acc[p["step"]])
        at_win = max(shared, key=lambda p: winrate(p)[0])
        a, w = winrate(at_acc), winrate(at_win)
        f.ours = (f"{run.name}: reward-acc peak at step {at_acc['step']} (win-rate {show(a, signed=False)}); "
                  f"win-rate peak at step {at_win['step']} ({show(w, signed=False)})")
        if at_acc["step"] == at_win["step"] or a[0] >= w[0]:
            f.verdict, f.reason = AGREES, "the win-rate at the reward-accuracy peak is the best win-rate"
        elif a[2] < w[1]:
            f.verdict, f.reason = DISAGREES, "the win-rate at the reward-accuracy peak is below the best beyond both CIs"
        else:
            f.verdict, f.reason = NOT_SHOWN, ("the two peaks are at different checkpoints, but their CIs overlap "
                                              "(too few prompts to tell)")
        return
    f.verdict, f.reason = _missing("f_training_length", "needs win-rate and reward accuracy at 3 or more shared checkpoints")


FINDINGS: list[tuple[Finding, Callable[[Path, Finding], None]]] = [
    (Finding("DPO improves downstream accuracy over the base model", "about +2% (Table 1)"), dpo_downstream),
    (Finding("DPO improves the judged win-rate over SFT", "-"), dpo_winrate),
    (Finding("fp32 and bf16 DPO are about equal", "difference not significant (Table 2)"), precision_equal),
    (Finding("full fine-tuning is at least as good as LoRA", "- (Table 2)"), full_vs_lora),
    (Finding("a higher beta forgets less (held-out loss on pre-training text)", "- (Table 3)"), beta_forgetting),
    (Finding("a small beta (< 0.1) suits chat data", "- (Table 4)"), small_beta_chat),
    (Finding("HH-trained DPO generalises to SHP, beating SHP-trained DPO there", "- (Table 5)"), hh_generalises),
    (Finding("the SFT data matters: Alpaca SFT + HH DPO is best", "- (Tables 5, 6)"), sft_data_matters),
    (Finding("the win-rate peaks with the reward accuracy", "- (Figs. 3, 4)"), peaks_together),
]
"""Every finding of the study and the function that measures ours (filling ``ours``, verdict, reason)."""


def findings(root: Path, left_out: dict[str, str] | None = None) -> list[Finding]:
    """Each finding with our figure and verdict, from the experiment folders under ``root``; a finding
    not shown for want of an experiment that was left out (``left_out``: experiment -> why) gives that
    reason."""
    out = []
    for template, measure in FINDINGS:
        f = Finding(template.claim, template.study)
        measure(Path(root), f)
        for experiment, why in (left_out or {}).items():
            if f.verdict == NOT_SHOWN and f.reason.startswith(f"{experiment}:"):
                f.reason = f"{experiment} was not run: {why}"
        out.append(f)
    return out


def findings_table(rows: list[Finding]) -> tuple[list[str], list[list[str]]]:
    head = ["the study's finding", "its number", "ours [95% CI]", "verdict"]
    return head, [[f.claim, f.study, f.ours, f.verdict + (f": {f.reason}" if f.reason else "")] for f in rows]


def write_findings(root: Path, out_dir: Path, left_out: dict[str, str] | None = None) -> Path:
    """``out_dir/findings.md`` (the findings table first, then where each experiment's report is) and
    ``findings.json``; returns the Markdown's path."""
    rows = findings(root, left_out)
    out_dir = Path(out_dir)
    lines = ["# The Cerebras DPO study, redone", "", "## Findings", "", markdown_table(*findings_table(rows)), "",
             "## Experiments", ""]
    for exp in sorted(p for p in Path(root).iterdir() if SweepDir(p).state.is_file()) if Path(root).is_dir() else []:
        lines.append(f"- {exp.name}: {SweepDir(exp).report_dir / 'report.md'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "findings.md"
    path.write_text("\n".join(lines) + "\n")
    write_json(out_dir / "findings.json", [vars(f) for f in rows])
    return path
