"""The report's PNG figures (matplotlib's object API: no pyplot, no backend switch): reward accuracy and loss/margin curves against
tokens seen with the early-stopping point marked, win-rate with CI bars, forgetting per model, and
win-rate and downstream accuracy over training from evaluated snapshots (``eval/curve.json``).
Each function takes the loaded runs and a target path, and returns the path, or None when the runs
hold nothing to plot. Reading run folders lives in report.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from preftune.eval.tasks import mean_accuracy
from preftune.report.runs import Run, StageRun

DPI = 110


def _series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(tokens_seen, value) of every metrics line that carries ``key``."""
    pts = [(m.get("tokens_seen", m.get("step", 0)), m[key]) for m in metrics
           if isinstance(m.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def best_point(stage: StageRun, key: str) -> tuple[float, float] | None:
    """(tokens_seen, ``key``) at the run's ``best_step`` (the early-stopping point), when recorded."""
    best = stage.run.get("best_step")
    if best is None:
        return None
    for m in stage.metrics:
        if m.get("step") == best and isinstance(m.get(key), (int, float)):
            return m.get("tokens_seen", best), m[key]
    return None


def _subplots(*grid, figsize, **kw):
    """A figure and its axes, without pyplot: no global figure registry and no backend switch (PNG
    output goes through matplotlib's Agg canvas whatever the session's backend is)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _curves(ax, runs: list[Run], key: str, stages: tuple[str, ...], mark_best: bool) -> bool:
    """Train ``key`` (line) and ``eval/key`` (markers) per run and stage; the best step as a star."""
    drawn = False
    for run in runs:
        for name in stages:
            stage = run.stages.get(name)
            if stage is None:
                continue
            label = run.name if len(stages) == 1 else f"{run.name} {name}"
            x, y = _series(stage.metrics, key)
            if x:
                line = ax.plot(x, y, lw=1, alpha=0.6, label=f"{label} train")[0]
                color = line.get_color()
            else:
                color = None
            ex, ey = _series(stage.metrics, f"eval/{key}")
            if ex:
                line = ax.plot(ex, ey, "o-", ms=4, color=color, label=f"{label} eval")[0]
                color = line.get_color()
            best = best_point(stage, f"eval/{key}") if mark_best else None
            if best:
                ax.axvline(best[0], color=color, ls=":", lw=1)
                ax.plot([best[0]], [best[1]], "*", ms=14, color=color, mec="black",
                        label=f"{label} best (step {stage.run.get('best_step')})")
            drawn = drawn or bool(x or ex)
    return drawn


def rewards_accuracy_plot(runs: list[Run], path: Path) -> Path | None:
    """Train and eval ``rewards/accuracies`` against tokens seen; the early-stopping point starred."""
    fig, ax = _subplots(figsize=(7, 4))
    if not _curves(ax, runs, "rewards/accuracies", ("dpo",), mark_best=True):
        return None
    ax.set(xlabel="tokens seen", ylabel="rewards/accuracies", title="Reward accuracy (preference stage)")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    return _save(fig, path)


# (stage, metric, title) of each panel of the loss-and-margins figure; panels without data are left out
LOSS_PANELS = (
    ("sft", "loss", "SFT loss"),
    ("dpo", "loss", "Preference loss"),
    ("dpo", "rewards/margins", "Reward margin (preference stage)"),
)


def loss_margins_plot(runs: list[Run], path: Path) -> Path | None:
    """The loss of each stage (own panels: their scales differ) and ``rewards/margins``, against tokens seen."""
    panels = [p for p in LOSS_PANELS if any(_series(r.stages[p[0]].metrics, p[1])[0] or
                                            _series(r.stages[p[0]].metrics, f"eval/{p[1]}")[0]
                                            for r in runs if p[0] in r.stages)]
    if not panels:
        return None
    fig, axes = _subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (stage, key, title) in zip(axes[0], panels):
        _curves(ax, runs, key, (stage,), mark_best=stage == "dpo")
        ax.set(xlabel="tokens seen", ylabel=key, title=title)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _identity(run: Run, model: str, entry: dict) -> str:
    """What makes two runs' models the same model: the resolved stage folder (a sweep's runs link one
    shared SFT stage), else the evaluated path, else the figures themselves."""
    stage = run.stages.get(model)
    if stage is not None:
        return str(stage.path.resolve())
    return entry.get("path") or json.dumps(entry, sort_keys=True, default=str)


def model_entries(runs: list[Run]) -> list[tuple[str, dict]]:
    """(label, eval.json entry) for every run and model, in order of first appearance. A model that
    several runs share (the base, a sweep's shared SFT stage) comes once, under its own name; any
    other model is labelled ``run/model`` when there are several runs."""
    groups: dict[tuple[str, str], tuple[str, dict, list[str]]] = {}
    for run in runs:
        for model, entry in run.eval.get("models", {}).items():
            groups.setdefault((model, _identity(run, model, entry)), (model, entry, []))[2].append(run.name)
    return [(model if len(runs) == 1 or len(names) > 1 else f"{names[0]}/{model}", entry)
            for model, entry, names in groups.values()]


def _model_rows(runs: list[Run], section: str) -> list[tuple[str, dict]]:
    """(label, eval section) for every model of ``model_entries`` that has ``section``."""
    return [(label, entry[section]) for label, entry in model_entries(runs) if entry.get(section)]


def winrate_plot(runs: list[Run], path: Path) -> Path | None:
    """Win-rate per model with its 95% Wilson interval as error bars."""
    rows = [(label, w) for label, w in _model_rows(runs, "winrate") if "winrate" in w]
    if not rows:
        return None
    fig, ax = _subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 4))
    x = range(len(rows))
    rates = [w["winrate"] for _, w in rows]
    # clamped at 0: at 0 or n wins of n a Wilson bound equals the rate only up to rounding
    low = [max(0.0, w["winrate"] - w.get("ci_low", w["winrate"])) for _, w in rows]
    high = [max(0.0, w.get("ci_high", w["winrate"]) - w["winrate"]) for _, w in rows]
    ax.bar(x, rates, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.8)
    for i, r in zip(x, rates):
        ax.text(i, r + 0.02, f"{r:.2f}", ha="center", fontsize=8)
    vs = rows[0][1].get("vs", "chosen")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), [label for label, _ in rows], rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="win-rate", title=f"Win-rate vs {vs} (95% Wilson CI)")
    return _save(fig, path)


def forgetting_plot(runs: list[Run], path: Path) -> Path | None:
    """Held-out bits per byte per model, and the paired difference from the base with its CI."""
    rows = [(label, h) for label, h in _model_rows(runs, "heldout") if "bpb" in h]
    if not rows:
        return None
    fig, (a1, a2) = _subplots(1, 2, figsize=(11, 4))
    x = list(range(len(rows)))
    a1.bar(x, [h["bpb"] for _, h in rows], color="tab:orange", alpha=0.8)
    for i, (_, h) in zip(x, rows):
        a1.text(i, h["bpb"], f"{h['bpb']:.3f}", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(x, [label for label, _ in rows], rotation=20, ha="right", fontsize=8)
    a1.set(ylabel="bits per byte", title="Held-out loss (lower = less forgetting)")
    diffs = [(label, h["diff_vs_base"]) for label, h in rows if h.get("diff_vs_base")]
    if diffs:
        dx = list(range(len(diffs)))
        means = [d["mean"] for _, d in diffs]
        err = [[d["mean"] - d["low"] for _, d in diffs], [d["high"] - d["mean"] for _, d in diffs]]
        a2.bar(dx, means, yerr=err, capsize=4, color="tab:red", alpha=0.8)
        a2.axhline(0, color="grey", lw=0.8)
        a2.set_xticks(dx, [label for label, _ in diffs], rotation=20, ha="right", fontsize=8)
    a2.set(ylabel="Δ bits per byte vs base", title="Forgetting: paired difference (95% bootstrap CI)")
    return _save(fig, path)


# (label suffix, value of a point, its (low, high) band or None, line style) of one series in a curve figure
CurveSeries = tuple[str, Callable[[dict], "float | None"], Callable[[dict], "tuple[float, float] | None"], str]


def _curve_figure(runs: list[Run], path: Path, series: list[CurveSeries], ylabel: str, title: str) -> Path | None:
    """One line per run and series against tokens seen, a CI band where given, and the run's
    early-stopping point (``best_step``) as a dotted line and a star."""
    fig, ax = _subplots(figsize=(9, 4))
    drawn = False
    for run in runs:
        points = run.curve.get("points", [])
        best = run.curve.get("best_step")
        color = None
        for suffix, value, band, style in series:
            pts = [(p["tokens_seen"], value(p), band(p), p["step"]) for p in points if value(p) is not None]
            if not pts:
                continue
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            line = ax.plot(x, y, style, ms=4, color=color, label=f"{run.name}{suffix}")[0]
            color = line.get_color()
            bands = [p for p in pts if p[2] is not None]
            if bands:
                ax.fill_between([p[0] for p in bands], [p[2][0] for p in bands], [p[2][1] for p in bands],
                                color=color, alpha=0.12, lw=0)
            at_best = [p for p in pts if p[3] == best]
            if at_best:
                ax.axvline(at_best[0][0], color=color, ls=":", lw=1)
                ax.plot([at_best[0][0]], [at_best[0][1]], "*", ms=14, color=color, mec="black",
                        label=f"{run.name} best (step {best})" if suffix == series[0][0] else None)
            drawn = True
    if not drawn:
        return None
    ax.set(xlabel="tokens seen", ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
    return _save(fig, path)


def _ci_band(section: str, key: str):
    def band(p: dict):
        d = p.get(section, {})
        return (d["ci_low"], d["ci_high"]) if d.get(key) is not None and "ci_low" in d else None

    return band


def winrate_curve_plot(runs: list[Run], path: Path) -> Path | None:
    """Win-rate against the chosen responses over training, with its 95% Wilson band (Figure 3)."""
    series = [("", lambda p: p.get("winrate", {}).get("winrate"), _ci_band("winrate", "winrate"), "o-")]
    return _curve_figure(runs, path, series, "win-rate vs chosen", "Win-rate over training (95% Wilson CI)")


def downstream_curve_plot(runs: list[Run], path: Path) -> Path | None:
    """Mean downstream task accuracy (solid) and checked-answer accuracy (dashed, 95% Wilson band) over
    training (Figure 4)."""
    series = [(" tasks", lambda p: mean_accuracy(p.get("tasks", {})), lambda p: None, "o-"),
              (" checked answers", lambda p: p.get("checked", {}).get("accuracy"),
               _ci_band("checked", "accuracy"), "s--")]
    return _curve_figure(runs, path, series, "accuracy", "Downstream accuracy over training")


def reward_kl_plot(runs: list[Run], path: Path) -> Path | None:
    """The reward-KL frontier (the DPO paper's Figure 2): each tuned model's checked-answer accuracy
    (win-rate where no row is checkable) against its per-token KL from its reference, one point per
    model of ``model_entries`` (each beta of a sweep, each on-policy round; a shared SFT model once)."""
    points = []
    for label, entry in model_entries(runs):
        kl = (entry.get("kl") or {}).get("kl")
        reward = (entry.get("checked") or {}).get("accuracy")
        if reward is None:
            reward = (entry.get("winrate") or {}).get("winrate")
        if kl is not None and reward is not None:
            points.append((label, kl, reward))
    if not points:
        return None
    fig, ax = _subplots(figsize=(6, 4.5))
    ax.scatter([k for _, k, _ in points], [r for _, _, r in points], color="tab:purple")
    for label, k, r in points:
        ax.annotate(label, (k, r), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="KL(policy || reference) per token, held-out completions",
           ylabel="checked accuracy (or win-rate)", title="Reward against drift from the reference")
    return _save(fig, path)


PLOTS = {
    "rewards_accuracies.png": rewards_accuracy_plot,
    "loss_margins.png": loss_margins_plot,
    "winrate.png": winrate_plot,
    "forgetting.png": forgetting_plot,
    "winrate_curve.png": winrate_curve_plot,
    "downstream_curve.png": downstream_curve_plot,
    "reward_kl.png": reward_kl_plot,
}
"""File name -> plot function; the report embeds every one that has data."""
