"""``preftune report``: read pipeline, stage or sweep run folders and write report.md plus a
self-contained report.html (PNG figures embedded as data URIs) with tables comparing the runs.
The figures themselves are drawn in plots.py; nothing here trains or evaluates.

Folders read (the training loop's and the eval suite's documented outputs):
  stage run     run.json, metrics.jsonl, config.yaml
  pipeline run  config.yaml, sft/ and dpo/ (stage runs), eval/eval.json (its ``datasets`` section too),
                eval/curve.json, timings.json
  sweep         sub-folders that are pipeline (or stage) runs, found up to two levels down
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from preftune.errors import PreftuneError
from preftune.eval.tasks import mean_accuracy
from preftune.report import plots

STAGES = ("sft", "dpo")


# ---------------------------------------------------------------- reading runs


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
    return (p / "run.json").is_file() or (p / "metrics.jsonl").is_file()


def is_pipeline_run(p: Path) -> bool:
    return any(is_stage_run(p / s) for s in STAGES) or (p / "eval" / "eval.json").is_file()


def load_stage(p: Path, stage: str | None = None) -> StageRun:
    run = _json(p / "run.json")
    return StageRun(p, run.get("stage", stage or p.name), run, read_metrics(p / "metrics.jsonl"), _yaml(p / "config.yaml"))


def load_run(p: Path, name: str | None = None) -> Run:
    """A pipeline run folder, or a single stage run folder (then the only stage)."""
    name = name or p.resolve().name
    if is_pipeline_run(p):
        stages = {s: load_stage(p / s, s) for s in STAGES if is_stage_run(p / s)}
        config = _yaml(p / "config.yaml") or next((s.config for s in stages.values()), {})
        return Run(name, p, config, stages, _json(p / "eval" / "eval.json"), _json(p / "timings.json"),
                   _json(p / "eval" / "curve.json"))
    stage = load_stage(p)
    return Run(name, p, stage.config, {stage.stage: stage}, _json(p / "eval" / "eval.json"), _json(p / "timings.json"),
               _json(p / "eval" / "curve.json"))


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


# ---------------------------------------------------------------- figures and tables


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def fmt_param(x) -> str:
    """Hyper-parameters as written (0.1, not 0.100)."""
    return f"{x:g}" if isinstance(x, float) else fmt(x)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _ci(w: dict, key: str = "winrate") -> str:
    if w.get(key) is None:
        return "-"
    return f"{fmt(w[key])} [{fmt(w.get('ci_low'), 2)}, {fmt(w.get('ci_high'), 2)}]"


def _diff(h: dict) -> str:
    d = h.get("diff_vs_base")
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "-"


def _beta(run: Run):
    dpo = run.stages.get("dpo")
    return (dpo.run.get("beta") if dpo else None) or _get(run.config, "dpo.beta")


def _dataset(run: Run) -> str:
    return str(_get(run.config, "data.source") or "-")


Table = tuple[list[str], list[list[str]]]


def runs_table(runs: list[Run]) -> Table:
    head = ["run", "stage", "loss", "beta", "steps", "tokens seen", "best step", "best metric", "stopped early",
            "wall time (s)"]
    rows = []
    for run in runs:
        for s in run.stages.values():
            r = s.run
            rows.append([run.name, s.stage, fmt(r.get("loss")), fmt_param(r.get("beta")), fmt(r.get("steps")),
                         fmt(r.get("tokens_seen")), fmt(r.get("best_step")), fmt(r.get("best_metric"), 4),
                         fmt(r.get("stopped_early")), fmt(r.get("wall_time_s"), 1)])
    return head, rows


def eval_table(runs: list[Run]) -> Table:
    head = ["run", "model", "reward acc (± se)", "win-rate [95% CI]", "W / T / L / invalid", "LC win-rate",
            "checked acc [95% CI]", "nll", "ppl", "bits/byte", "Δ bits/byte vs base [95% CI]", "task acc (mean)"]
    rows = []
    for run in runs:
        for model, e in run.eval.get("models", {}).items():
            rw, w, h = e.get("rewards", {}), e.get("winrate", {}), e.get("heldout", {})
            acc = rw.get("rewards/accuracies")
            wtl = " / ".join(fmt(w.get(k)) for k in ("wins", "ties", "losses", "invalid")) if w else "-"
            rows.append([run.name, model, f"{fmt(acc)} ± {fmt(rw.get('se'))}" if acc is not None else "-", _ci(w),
                         wtl, fmt(w.get("lc_winrate")), _ci(e.get("checked", {}), "accuracy"), fmt(h.get("nll"), 4), fmt(h.get("ppl"), 2),
                         fmt(h.get("bpb"), 4), _diff(h), fmt(mean_accuracy(e.get("tasks", {})))])
    return head, rows


def _source_label(source) -> str:
    """A data source as a short label: a local file or folder by its stem, anything else as written."""
    text = str(source)
    if text.startswith(("/", ".", "~")) or Path(text).suffix in (".jsonl", ".json", ".parquet", ".csv"):
        return Path(text).stem or text
    return text


def _trained_on(run: Run, model: str) -> str:
    """The data behind one of the run's models: the SFT data for ``sft``, ``SFT data -> preference
    data`` for ``dpo`` and on-policy rounds (rounds add their own samples of the same prompts)."""
    if model != "sft" and model != "dpo" and not model.startswith("round-"):
        return "-"
    prefs = _source_label(_get(run.config, "data.source") or "-")
    sft = _source_label(_get(run.config, "sft.data.source") or prefs)
    if model == "sft":
        return sft
    return f"{sft} → {prefs}" if _get(run.config, "sft.enabled") is not False else prefs


def datasets_table(runs: list[Run]) -> Table:
    """Every model on every ``eval.datasets`` entry (the study's Tables 5 and 6): one row per run and
    model, one column group per evaluation dataset (reward acc, win-rate, and checked accuracy where
    that dataset's rows are checkable)."""
    names = list(dict.fromkeys(d for r in runs for d in r.eval.get("datasets", {})))
    checkable = {d for r in runs for d, per in r.eval.get("datasets", {}).items() for e in per.values()
                 if e.get("checked")}
    head = ["run", "model", "trained on"]
    for d in names:
        head += [f"{d}: reward acc (± se)", f"{d}: win-rate [95% CI]"] + ([f"{d}: checked acc [95% CI]"]
                                                                          if d in checkable else [])
    rows = []
    for run in runs:
        per_dataset = run.eval.get("datasets", {})
        for model in dict.fromkeys(m for per_model in per_dataset.values() for m in per_model):
            row = [run.name, model, _trained_on(run, model)]
            for d in names:
                e = per_dataset.get(d, {}).get(model, {})
                rw = e.get("rewards", {})
                acc = rw.get("rewards/accuracies")
                row += [f"{fmt(acc)} ± {fmt(rw.get('se'))}" if acc is not None else "-", _ci(e.get("winrate", {}))]
                if d in checkable:
                    row.append(_ci(e.get("checked", {}), "accuracy"))
            rows.append(row)
    return head, rows


def _tuned(run: Run) -> tuple[str, dict] | None:
    """The run's last tuned model's eval entry (dpo, else sft)."""
    models = run.eval.get("models", {})
    for name in ("dpo", "sft"):
        if name in models:
            return name, models[name]
    return None


def beta_dataset_table(runs: list[Run]) -> Table:
    """Win-rate [CI] and mean downstream accuracy of the tuned model, rows = beta, columns = dataset
    (the study's Table 4)."""
    datasets = sorted({_dataset(r) for r in runs if _tuned(r)})
    cells: dict[tuple, list[str]] = {}
    for run in runs:
        t = _tuned(run)
        if t:
            text = f"{_ci(t[1].get('winrate', {}))}; acc {fmt(mean_accuracy(t[1].get('tasks', {})))}"
            cells.setdefault((_beta(run), _dataset(run)), []).append(text)
    betas = sorted({b for b, _ in cells}, key=lambda b: (b is None, b if b is not None else 0))
    rows = [[fmt_param(b)] + ["<br>".join(cells.get((b, d), ["-"])) for d in datasets] for b in betas]
    return ["beta"] + [f"{d}: win-rate [CI]; task acc" for d in datasets], rows


def heldout_beta_table(runs: list[Run]) -> Table:
    """Held-out loss by beta with the base model first (the study's Table 3)."""
    head = ["beta", "run / model", "nll", "ppl", "bits/byte", "Δ bits/byte vs base [95% CI]"]
    rows, bases = [], set()
    for run in runs:
        base = run.eval.get("models", {}).get("base", {}).get("heldout")
        if base and base.get("bpb") not in bases:
            bases.add(base.get("bpb"))
            rows.append(["base", "base", fmt(base.get("nll"), 4), fmt(base.get("ppl"), 2), fmt(base.get("bpb"), 4), "-"])
    tuned = []
    for run in runs:
        t = _tuned(run)
        if t and t[1].get("heldout"):
            h = t[1]["heldout"]
            tuned.append((_beta(run) if _beta(run) is not None else math.inf, [
                fmt_param(_beta(run)), f"{run.name}/{t[0]}", fmt(h.get("nll"), 4), fmt(h.get("ppl"), 2),
                fmt(h.get("bpb"), 4), _diff(h)]))
    return head, rows + [r for _, r in sorted(tuned, key=lambda x: x[0])]


def variants_table(runs: list[Run]) -> Table:
    """fp32 vs bf16 vs LoRA side by side (the study's Table 2)."""
    head = ["run", "precision", "lora", "loss", "beta", "reward acc", "win-rate [95% CI]", "bits/byte",
            "task acc (mean)"]
    rows = []
    for run in runs:
        t = _tuned(run)
        e = t[1] if t else {}
        dpo = run.stages.get("dpo")
        rows.append([run.name, fmt(_get(run.config, "precision")), fmt(_get(run.config, "lora.enabled")),
                     fmt((dpo.run.get("loss") if dpo else None) or _get(run.config, "dpo.loss")), fmt_param(_beta(run)),
                     fmt(e.get("rewards", {}).get("rewards/accuracies")), _ci(e.get("winrate", {})),
                     fmt(e.get("heldout", {}).get("bpb"), 4), fmt(mean_accuracy(e.get("tasks", {})))])
    return head, rows


def tasks_table(runs: list[Run]) -> Table:
    names = sorted({t for r in runs for e in r.eval.get("models", {}).values() for t in e.get("tasks", {})})
    rows = []
    for run in runs:
        for model, e in run.eval.get("models", {}).items():
            if e.get("tasks"):
                rows.append([run.name, model] + [
                    f"{fmt(e['tasks'].get(t, {}).get('acc'))} / {fmt(e['tasks'].get(t, {}).get('acc_norm'))}"
                    + f" (n={fmt(e['tasks'].get(t, {}).get('n'))})" for t in names])
    return ["run", "model"] + [f"{t}: acc / acc_norm" for t in names], rows


def category_table(runs: list[Run]) -> Table:
    """Win-rate per category (helpful vs harmless, or the synthetic task types)."""
    rows = []
    for run in runs:
        for model, e in run.eval.get("models", {}).items():
            for cat, w in (e.get("winrate", {}).get("by_category") or {}).items():
                rows.append([run.name, model, str(cat), fmt(w.get("n")), _ci(w)])
    return ["run", "model", "category", "n", "win-rate [95% CI]"], rows


def curve_table(runs: list[Run]) -> Table:
    """Win-rate, checked accuracy and downstream accuracy at each evaluated point of training (the
    figures behind the curves), with the early-stopping point marked."""
    head = ["run", "step", "tokens seen", "win-rate [95% CI]", "checked acc [95% CI]", "task acc (mean)", "note"]
    rows = []
    for run in runs:
        best = run.curve.get("best_step")
        for pt in run.curve.get("points", []):
            rows.append([run.name, fmt(pt["step"]), fmt(pt["tokens_seen"]), _ci(pt.get("winrate", {})),
                         _ci(pt.get("checked", {}), "accuracy"), fmt(mean_accuracy(pt.get("tasks", {}))),
                         "best (early-stopping point)" if pt["step"] == best else ""])
    return head, rows


def timings_table(runs: list[Run]) -> Table:
    stages = list(dict.fromkeys(k for r in runs for k in r.timings))
    rows = [[r.name] + [fmt(r.timings.get(s), 1) for s in stages] for r in runs if r.timings]
    return ["run"] + [f"{s} (s)" for s in stages], rows


def comparisons_table(runs: list[Run]) -> Table:
    """Paired bootstrap of win-rate differences between models over the same prompts."""
    rows = []
    for run in runs:
        for pair, c in run.eval.get("comparisons", {}).items():
            rows.append([run.name, pair, fmt(c.get("mean")), f"[{fmt(c.get('low'))}, {fmt(c.get('high'))}]"])
    return ["run", "models", "win-rate difference", "95% CI (paired bootstrap)"], rows


TABLES: list[tuple[str, Callable[[list[Run]], Table]]] = [
    ("Runs", runs_table),
    ("Evaluation", eval_table),
    ("Models across evaluation datasets", datasets_table),
    ("Win-rate and downstream accuracy by beta and dataset", beta_dataset_table),
    ("Held-out loss by beta", heldout_beta_table),
    ("Precision and LoRA variants", variants_table),
    ("Win-rate by category", category_table),
    ("Win-rate differences", comparisons_table),
    ("Downstream tasks", tasks_table),
    ("Curves over training", curve_table),
    ("Stage timings", timings_table),
]
"""Section title -> table builder; a table without rows is left out."""


# ---------------------------------------------------------------- rendering


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c).replace('&lt;br&gt;', '<br>')}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}"""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def render(runs: list[Run], figures: dict[str, Path], out_dir: Path) -> tuple[str, str]:
    """(Markdown, HTML) of the report."""
    title = "preftune report"
    sources = ", ".join(f"`{r.path}`" for r in runs)
    md = [f"# {title}", "", f"Runs: {sources}", ""]
    hs = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head><body>",
          f"<h1>{title}</h1>", f"<p>Runs: {html.escape(sources.replace('`', ''))}</p>"]
    if figures:
        md.append("## Figures\n")
        hs.append("<h2>Figures</h2>")
        for name, png in figures.items():
            caption = name.removesuffix(".png").replace("_", " ")
            md.append(f"![{caption}]({png.relative_to(out_dir).as_posix()})\n")
            hs.append(f"<figure><img alt='{caption}' src='{_data_uri(png)}'><figcaption>{caption}</figcaption></figure>")
    for section, build in TABLES:
        head, rows = build(runs)
        if rows:
            md += [f"## {section}", "", markdown_table(head, rows), ""]
            hs += [f"<h2>{html.escape(section)}</h2>", html_table(head, rows)]
    hs.append("</body></html>")
    return "\n".join(md), "\n".join(hs)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write ``out_dir``/report.md, report.html and the PNG figures; return the HTML's path."""
    runs = discover_runs(list(run_dirs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, plot in plots.PLOTS.items():
        png = plot(runs, out / name)
        if png is not None:
            figures[name] = png
    md, page = render(runs, figures, out)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


def main(ns) -> int:
    """``preftune report RUN_DIR... [--out DIR]`` (default: RUN_DIR/report for one folder, else ./report)."""
    out = Path(ns.out) if ns.out else (Path(ns.runs[0]) / "report" if len(ns.runs) == 1 else Path("report"))
    path = write_report(ns.runs, out)
    print(f"report: {path} (and {path.with_suffix('.md')})")
    return 0
