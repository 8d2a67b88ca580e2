"""THE per-model results table of an ``eval.json``: every column's header and cell in one place, the
column sets of the CLI headline, the ``preftune eval`` table, the model card and the report, and the
three renderings (aligned text, Markdown, HTML). Reading runs lives in runs.py, the page in report.py."""

from __future__ import annotations

import html
import math
from collections.abc import Callable

from preftune.eval.tasks import mean_accuracy

Table = tuple[list[str], list[list[str]]]


def fmt(x, digits: int = 3) -> str:
    """A number with ``digits`` decimals; None, NaN and anything else non-numeric as ``-``."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _ci(d: dict, key: str) -> str:
    if d.get(key) is None:
        return "-"
    return f"{fmt(d[key])} [{fmt(d.get('ci_low'), 2)}, {fmt(d.get('ci_high'), 2)}]"


def _reward(e: dict, se: bool) -> str:
    rw = e.get("rewards", {})
    acc = rw.get("rewards/accuracies")
    if acc is None:
        return "-"
    return f"{fmt(acc)} ± {fmt(rw.get('se'))}" if se else fmt(acc)


def _bpb_delta(e: dict) -> str:
    h = e.get("heldout", {})
    d = h.get("diff_vs_base")
    return (fmt(h["bpb"], 4) + (f" ({d['mean']:+.4f})" if d else "")) if "bpb" in h else "-"


def _delta(e: dict, ci: bool) -> str:
    d = e.get("heldout", {}).get("diff_vs_base")
    if not d:
        return "-"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if ci else f"{d['mean']:+.4f}"


def _wtl(e: dict) -> str:
    w = e.get("winrate", {})
    return " / ".join(fmt(w.get(k)) for k in ("wins", "ties", "losses", "invalid")) if w else "-"


CELLS: dict[str, Callable[[dict], str]] = {
    "reward acc": lambda e: _reward(e, se=False),
    "reward acc (± se)": lambda e: _reward(e, se=True),
    "win-rate vs chosen [95% CI]": lambda e: _ci(e.get("winrate", {}), "winrate"),
    "win-rate [95% CI]": lambda e: _ci(e.get("winrate", {}), "winrate"),
    "W / T / L / invalid": _wtl,
    "LC win-rate": lambda e: fmt(e.get("winrate", {}).get("lc_winrate")),
    "checked acc [95% CI]": lambda e: _ci(e.get("checked", {}), "accuracy"),
    "nll": lambda e: fmt(e.get("heldout", {}).get("nll"), 4),
    "ppl": lambda e: fmt(e.get("heldout", {}).get("ppl"), 2),
    "bits/byte": lambda e: fmt(e.get("heldout", {}).get("bpb"), 4),
    "bits/byte (Δ vs base)": _bpb_delta,
    "Δ bits/byte vs base": lambda e: _delta(e, ci=False),
    "Δ bits/byte vs base [95% CI]": lambda e: _delta(e, ci=True),
    "task acc": lambda e: fmt(mean_accuracy(e.get("tasks", {}))),
    "KL/token": lambda e: fmt(e.get("kl", {}).get("kl"), 4),
}
"""Column header -> the cell of one model's ``eval.json`` entry."""

HEADLINE = ("reward acc", "win-rate vs chosen [95% CI]", "checked acc [95% CI]", "bits/byte (Δ vs base)", "task acc",
            "KL/token")
SUITE = ("reward acc", "win-rate [95% CI]", "W / T / L / invalid", "checked acc [95% CI]", "bits/byte",
         "Δ bits/byte vs base [95% CI]", "task acc")
CARD = ("reward acc (± se)", "win-rate vs chosen [95% CI]", "bits/byte", "Δ bits/byte vs base", "task acc")
REPORT = ("reward acc (± se)", "win-rate [95% CI]", "W / T / L / invalid", "LC win-rate", "checked acc [95% CI]",
          "nll", "ppl", "bits/byte", "Δ bits/byte vs base [95% CI]", "task acc")


def results_table(models: dict[str, dict], columns: tuple[str, ...] = HEADLINE, run: str | None = None) -> Table:
    """One row per model of ``models`` (``eval.json``'s ``models``): its name, then ``columns``; with
    ``run``, a first column naming the run (the report over several runs)."""
    lead = [] if run is None else [run]
    head = (["run"] if run is not None else []) + ["model", *columns]
    return head, [[*lead, name, *(CELLS[c](e) for c in columns)] for name, e in models.items()]


def comparison_lines(results: dict, checked: bool) -> list[str]:
    """The paired-bootstrap comparisons of ``eval.json``: checked accuracy with win-rate (the
    headline), or win-rate alone."""
    lines = []
    for pair, c in results.get("comparisons", {}).items():
        if checked and "checked_accuracy" in c:
            d = c["checked_accuracy"]
            lines.append(f"{pair}: checked accuracy {d['mean']:+.3f} [95% CI {d['low']:+.3f}, {d['high']:+.3f}] "
                         f"(paired bootstrap); win-rate vs chosen {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
        elif not checked:
            lines.append(f"win-rate {pair}: {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] (paired bootstrap)")
    return lines


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns aligned with two spaces, for the terminal."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])


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
