"""``preftune pipeline``: SFT, then DPO with the SFT model as the reference (never the bare base),
then evaluation of base, SFT and DPO side by side (and of DPO's snapshots, for curves over training,
when ``eval.curve_every`` is set) and a report. ``preftune quickstart`` runs it on
the shipped ``configs/quickstart.yaml``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from preftune.config import Config, to_yaml
from preftune.report.table import HEADLINE, comparison_lines, results_table, text_table

QUICKSTART = Path(__file__).parent / "resources" / "quickstart.yaml"


def run_pipeline(cfg: Config, resume: bool = False) -> dict:
    """Run every enabled stage into ``cfg.output_dir``; return the timings and the paths."""
    from preftune.model import is_adapter, merge_adapter, resolve_model
    from preftune.train import run_stage

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    timings: dict[str, float] = {}
    base = resolve_model(cfg.model)
    dpo_base = base

    if cfg.sft.enabled:
        t = time.time()
        if not (resume and (out / "sft" / "run.json").is_file()):
            run_stage(cfg, "sft", out / "sft", base, resume=resume)
        sft_model = out / "sft" / "final"
        if is_adapter(sft_model):
            # DPO's policy and reference both start from the SFT model: merge the SFT adapter into its
            # base so that fresh DPO adapters (or a disabled-adapter reference) sit on top of it.
            merged = out / "sft" / "merged"
            if not (merged / "config.json").is_file():
                merge_adapter(str(sft_model), merged)
            dpo_base = str(merged.resolve())  # absolute: the DPO adapter's config names it as its base
        else:
            dpo_base = str(sft_model.resolve())
        timings["sft"] = round(time.time() - t, 1)

    if cfg.dpo.enabled:
        t = time.time()
        if not (resume and (out / "dpo" / "run.json").is_file()):
            run_stage(cfg, "dpo", out / "dpo", dpo_base, resume=resume)
        timings["dpo"] = round(time.time() - t, 1)

    models = {"base": cfg.model}
    if cfg.sft.enabled:
        models["sft"] = str(out / "sft")
    if cfg.dpo.enabled:
        models["dpo"] = str(out / "dpo")
    t = time.time()
    from preftune.eval.suite import evaluate_models

    results = evaluate_models(cfg, models, out / "eval", reference_for={"dpo": dpo_base, "sft": base})
    if cfg.dpo.enabled and cfg.eval.curve_every:
        from preftune.eval.curve import evaluate_curve

        evaluate_curve(cfg, out / "dpo", out / "eval", start=dpo_base)
    timings["eval"] = round(time.time() - t, 1)
    from preftune.card import update_card

    update_card(out, results)  # the model cards now carry the evaluation figures
    (out / "timings.json").write_text(json.dumps(timings, indent=1))

    t = time.time()
    from preftune.report.report import write_report

    report = write_report([out], out / "report")
    timings["report"] = round(time.time() - t, 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return {"timings": timings, "report": str(report), "eval": results}


def headline(result: dict) -> str:
    """The headline figures per model, and the paired comparisons of checked accuracy."""
    table = text_table(*results_table(result["eval"].get("models", {}), HEADLINE))
    return "\n".join([table, *comparison_lines(result["eval"], checked=True)])
