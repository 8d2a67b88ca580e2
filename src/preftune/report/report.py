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
import math
from collections.abc import Callable
from pathlib import Path

from preftune.eval.tasks import mean_accuracy
from preftune.report import plots
from preftune.report.runs import Run, discover_runs
from preftune.report.table import REPORT, Table, fmt, html_table, markdown_table, results_table

# ---------------------------------------------------------------- figures and tables


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
    rows = [row for run in runs for row in results_table(run.eval.get("models", {}), REPORT, run=run.name)[1]]
    return results_table({}, REPORT, run="")[0], rows


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
