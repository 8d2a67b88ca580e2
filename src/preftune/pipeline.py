"""``preftune pipeline``: SFT, then DPO with the SFT model as the reference (never the bare base),
then evaluation of base, SFT and DPO side by side (and of DPO's snapshots, for curves over training,
when ``eval.curve_every`` is set) and a report. ``preftune quickstart`` runs it on
the shipped ``configs/quickstart.yaml``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from preftune.config import Config, load_config, to_yaml
from preftune.eval.tasks import mean_accuracy

QUICKSTART = Path(__file__).parent / "resources" / "quickstart.yaml"


def run_pipeline(cfg: Config, resume: bool = False, allow_changes: bool = False) -> dict:
    """Run every enabled stage into ``cfg.output_dir``; return the timings and the paths."""
    from preftune.checkpoint import clean_stale
    from preftune.model import is_adapter, merge_adapter, resolve_model
    from preftune.resume import check_writable
    from preftune.train import run_stage

    out = Path(cfg.output_dir)
    check_writable(out)
    clean_stale(out)
    (out / "config.yaml").write_text(to_yaml(cfg))
    timings: dict[str, float] = {}
    base = resolve_model(cfg.model)
    dpo_base = base

    if cfg.sft.enabled:
        t = time.time()
        if not (resume and (out / "sft" / "run.json").is_file()):
            run_stage(cfg, "sft", out / "sft", base, resume=resume, allow_changes=allow_changes)
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
            run_stage(cfg, "dpo", out / "dpo", dpo_base, resume=resume, allow_changes=allow_changes)
        timings["dpo"] = round(time.time() - t, 1)

    records = []
    if cfg.rounds.n:
        from preftune.rounds import run_rounds

        t = time.time()
        records = run_rounds(cfg, out, str((out / "dpo" / "final").resolve()) if cfg.dpo.enabled else dpo_base)
        timings["rounds"] = round(time.time() - t, 1)

    models = {"base": cfg.model}
    if cfg.sft.enabled:
        models["sft"] = str(out / "sft")
    if cfg.dpo.enabled:
        models["dpo"] = str(out / "dpo")
    reference_for = {"dpo": dpo_base, "sft": base}
    for rec in records:  # every round is measured against the SFT model, like the offline stage
        name = f"round-{rec['round']}"
        models[name] = str(Path(rec["final_model"]).parent)
        reference_for[name] = dpo_base
    t = time.time()
    from preftune.eval.suite import evaluate_models

    results = evaluate_models(cfg, models, out / "eval", reference_for=reference_for)
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
    return {"timings": timings, "report": str(report), "eval": results, "rounds": records}


def headline(result: dict) -> str:
    """A short table of the headline figures per model."""
    rows = [("model", "reward acc", "win-rate vs chosen [95% CI]", "checked acc [95% CI]", "bits/byte (Δ vs base)",
             "task acc", "KL/token")]
    for name, r in result["eval"].get("models", {}).items():
        rw, wr, ho, ck = r.get("rewards", {}), r.get("winrate", {}), r.get("heldout", {}), r.get("checked", {})
        acc = mean_accuracy(r.get("tasks", {}))
        diff = ho.get("diff_vs_base")
        rows.append((
            name,
            f"{rw['rewards/accuracies']:.3f}" if "rewards/accuracies" in rw else "-",
            f"{wr['winrate']:.3f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}]" if wr.get("winrate") is not None else "-",
            f"{ck['accuracy']:.3f} [{ck['ci_low']:.2f}, {ck['ci_high']:.2f}]" if ck else "-",
            (f"{ho['bpb']:.4f}" + (f" ({diff['mean']:+.4f})" if diff else "")) if "bpb" in ho else "-",
            f"{acc:.3f}" if acc is not None else "-",
            f"{r['kl']['kl']:.4f}" if r.get("kl", {}).get("kl") is not None else "-",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += rounds_table(result.get("rounds") or [])
    last = f"round-{result['rounds'][-1]['round']}" if result.get("rounds") else None
    for pair, c in result["eval"].get("comparisons", {}).items():
        if last and pair.startswith("round-") and pair not in (f"{last}-sft", f"{last}-dpo"):
            continue  # the last round against SFT and offline DPO; intermediate rounds are in the table
        if "checked_accuracy" in c:
            d = c["checked_accuracy"]
            lines.append(f"{pair}: checked accuracy {d['mean']:+.3f} [95% CI {d['low']:+.3f}, {d['high']:+.3f}] "
                         f"(paired bootstrap); win-rate vs chosen {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
    return "\n".join(lines)


def rounds_table(records: list[dict]) -> list[str]:
    """One line per on-policy round: pairs built, the samples' mean reward, held-out reward accuracy."""
    if not records:
        return []
    lines = ["", "on-policy rounds:"]
    for r in records:
        acc = r.get("eval/rewards/accuracies")
        lines.append(f"  round {r['round']}: {r['prompts']} prompts x {r['samples'] // max(1, r['prompts'])} samples, "
                     f"mean reward {r['reward_mean']:.3f}, {r['pairs']} pairs ({r['ties']} ties skipped), "
                     f"held-out reward acc {'-' if acc is None else format(acc, '.3f')}")
    return lines


def main(ns) -> int:
    from preftune.commands import setup_logging

    setup_logging()
    cfg = load_config(ns.config, ns.overrides)
    result = run_pipeline(cfg, resume=getattr(ns, "resume", False),
                          allow_changes=getattr(ns, "allow_changes", False))
    print(headline(result))
    print(f"\ntimings (s): {result['timings']}")
    print(f"report: {result['report']}")
    return 0


def quickstart(ns) -> int:
    ns.config = str(QUICKSTART)
    return main(ns)
