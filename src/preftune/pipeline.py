"""``preftune pipeline``: SFT, optionally a reward model and best-of-n sampling from the SFT model, then
DPO with the SFT model as the reference (never the bare base),
then evaluation of base, SFT and DPO side by side (and of DPO's snapshots, for curves over training,
when ``eval.curve_every`` is set) and a report. ``preftune quickstart`` runs it on
the shipped ``configs/quickstart.yaml``."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from preftune import preflight
from preftune.bon import run_bon
from preftune.card import update_card
from preftune.checkpoint import clean_stale
from preftune.config import Config, to_yaml
from preftune.data.sources import load_rows
from preftune.eval.curve import evaluate_curve
from preftune.eval.engines import make_engine
from preftune.eval.judges import preflight as preflight_judge
from preftune.eval.reward_model import evaluate_reward_model
from preftune.eval.suite import evaluate_models, heldout_rows, winrate_problem, winrate_rows
from preftune.files import write_json
from preftune.model import is_adapter, merge_adapter, model_folder, pinned_model
from preftune.paths import STAGES, RunDir
from preftune.report.report import write_report
from preftune.report.table import HEADLINE, comparison_lines, results_table, text_table
from preftune.resume import check_writable, finished_alike
from preftune.reward import load_reward_model
from preftune.rounds import run_rounds
from preftune.train import run_stage, setup

log = logging.getLogger("preftune")

QUICKSTART = Path(__file__).parent / "resources" / "quickstart.yaml"


def train_stages(cfg: Config, run: RunDir, resume: bool, allow_changes: bool = False,
                 **stage_options) -> tuple[str, dict[str, float]]:
    """SFT (when enabled), then DPO from the SFT model; a finished stage is skipped on ``resume`` or when
    it finished with this config (``stage_options``: run_stage's ``overwrite`` and ``preflight``).
    Returns the model DPO started from (its reference) and the timings."""
    timings: dict[str, float] = {}
    base = model_folder(cfg)
    dpo_base = base
    if cfg.sft.enabled:
        t = time.time()
        sft = run.stage("sft")
        if not (resume and sft.is_finished() or finished_alike(sft.root, cfg, "sft")):
            run_stage(cfg, "sft", sft.root, base, resume=resume, allow_changes=allow_changes, **stage_options)
        if is_adapter(sft.final):
            # DPO's policy and reference both start from the SFT model: merge the SFT adapter into its
            # base so that fresh DPO adapters (or a disabled-adapter reference) sit on top of it.
            if not (run.merged_sft / "config.json").is_file():
                merge_adapter(str(sft.final), run.merged_sft)
            dpo_base = str(run.merged_sft.resolve())  # absolute: the DPO adapter's config names it as its base
        else:
            dpo_base = str(sft.final.resolve())
        timings["sft"] = round(time.time() - t, 1)
    for stage, run_it in (("rm", train_reward_model), ("bon", best_of_n)):  # optional, from the SFT model
        if getattr(cfg, stage).enabled:
            t = time.time()
            run_it(cfg, run, dpo_base, resume, allow_changes)
            timings[stage] = round(time.time() - t, 1)
    if cfg.dpo.enabled:
        t = time.time()
        dpo = run.stage("dpo")
        if not (resume and dpo.is_finished() or finished_alike(dpo.root, cfg, "dpo")):
            run_stage(cfg, "dpo", dpo.root, dpo_base, resume=resume, allow_changes=allow_changes, **stage_options)
        timings["dpo"] = round(time.time() - t, 1)
    return dpo_base, timings


def train_reward_model(cfg: Config, run: RunDir, start: str, resume: bool, allow_changes: bool) -> None:
    """The ``rm`` stage: a reward model from the SFT model (as in the RLHF recipe), with its figures."""
    rm = run.stage("rm")
    if not (resume and rm.is_finished()):
        run_stage(cfg, "rm", rm.root, start, resume=resume, allow_changes=allow_changes)
    write_json(rm.root / "eval_rm.json", evaluate_reward_model(
        load_reward_model(str(rm.root), "rm"), load_rows(cfg.data, "preference", cfg.seed)[1], cfg.data,
        cfg.eval.batch_size))


def best_of_n(cfg: Config, run: RunDir, start: str, resume: bool, allow_changes: bool) -> None:
    """The ``bon`` step: best-of-n samples of the SFT model into ``bon/`` (skipped on resume once written)."""
    if not (resume and run.bon.summary.is_file()):
        run_bon(with_reward_model(cfg, run), start, run.bon.root)


def with_reward_model(cfg: Config, run: RunDir) -> Config:
    """``cfg`` with the run's own reward model (``rm/``) wherever a reward model is asked for and none is named."""
    if not cfg.rm.enabled:
        return cfg
    path = str(run.stage("rm").root.resolve())
    rounds, w = cfg.rounds, cfg.eval.winrate
    if rounds.reward == "reward_model" and not rounds.reward_model:
        cfg = dataclasses.replace(cfg, rounds=dataclasses.replace(rounds, reward_model=path))
    if w.judge == "reward_model" and not w.judge_model:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, winrate=dataclasses.replace(w, judge_model=path)))
    return cfg


def run_pipeline(cfg: Config, resume: bool = False, allow_changes: bool = False, **stage_options) -> dict:
    """Run every enabled stage (and the on-policy rounds) into ``cfg.output_dir``, evaluate, refresh the
    model cards and write the report; return the timings, the report's path, the evaluation and the rounds.
    ``stage_options``: run_stage's ``overwrite`` and ``preflight``."""
    run = RunDir(cfg.output_dir)
    check_writable(run.root)
    clean_stale(run.root)
    if cfg.eval.winrate.enabled and (problem := winrate_problem(cfg, winrate_rows(heldout_rows(cfg),
                                                                                  cfg.eval.winrate.per_category))):
        log.warning("win-rate will be skipped: %s", problem)  # said before training, not after it
    run.config.write_text(to_yaml(cfg))
    preflight_judge(cfg.eval.winrate)  # an unusable LLM judge stops the run before any training
    if cfg.generation.engine != "builtin":
        make_engine(cfg).close()  # an engine not installed or not reachable stops here, before any training
    dpo_base, timings = train_stages(cfg, run, resume, allow_changes, **stage_options)
    cfg = with_reward_model(cfg, run)

    records = []
    if cfg.rounds.n:
        t = time.time()
        start = str(run.stage("dpo").final.resolve()) if cfg.dpo.enabled else dpo_base
        records = run_rounds(cfg, run.root, start)
        timings["rounds"] = round(time.time() - t, 1)

    t = time.time()
    models = {"base": pinned_model(cfg)} | {s: str(run.stage(s).root) for s in STAGES if getattr(cfg, s).enabled}
    reference_for = {"dpo": dpo_base, "sft": model_folder(cfg)}
    for rec in records:  # every round is measured against the SFT model, like the offline stage
        name = f"round-{rec['round']}"
        models[name] = str(Path(rec["final_model"]).parent)
        reference_for[name] = dpo_base
    earlier_rounds = [f"round-{rec['round']}" for rec in records[:-1]]  # generations and KL only
    results = evaluate_models(cfg, models, run.eval_dir, reference_for=reference_for, brief=earlier_rounds)
    if cfg.dpo.enabled and cfg.eval.curve_every:
        evaluate_curve(cfg, run.stage("dpo").root, run.eval_dir, start=dpo_base)
    timings["eval"] = round(time.time() - t, 1)
    update_card(run.root, results)  # the model cards now carry the evaluation figures
    write_json(run.timings, timings)

    t = time.time()
    report = write_report([run.root], run.report_dir)
    timings["report"] = round(time.time() - t, 1)
    write_json(run.timings, timings)
    return {"timings": timings, "report": str(report), "eval": results, "rounds": records}


def _short(value) -> str:
    text = "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 48 else text[:45] + "..."


def check_stages(cfg: Config) -> list[list[str]]:
    """``preftune check``: each enabled stage's data, model and preflight checks on its first batch,
    without training (a stage's folder is a temporary one; DPO starts from ``model`` here, as the SFT
    model does not exist yet) and whether the win-rate's judge can score its rows. One row per check:
    ``[stage, check, ok|warn|FAILED, value, tolerance, note]``."""
    rows = []
    base = model_folder(cfg)
    for stage in (s for s in STAGES if getattr(cfg, s).enabled):
        with tempfile.TemporaryDirectory(prefix=f"preftune-check-{stage}-") as tmp:
            st = setup(cfg, stage, tmp, base, preflight=None)
            account = st.data.report.get("drops", {})
            rows.append([stage, "data", "ok", f"{len(st.data.train)} train / {len(st.data.test)} held-out",
                         "", f"{account.get('rows_read', '?')} read, {account.get('bad', 0)} bad"])
            for c in preflight.run_checks(st):
                verdict = "FAILED" if not c.ok else "n/a" if c.value is None else "warn" if c.detail else "ok"
                rows.append([stage, c.name, verdict, _short(c.value),
                             _short(c.tolerance), c.detail])
            del st
    if cfg.eval.winrate.enabled:
        problem = winrate_problem(cfg, winrate_rows(heldout_rows(cfg), cfg.eval.winrate.per_category))
        rows.append(["eval", "winrate", "warn" if problem else "ok", cfg.eval.winrate.judge, "",
                     f"skipped: {problem}" if problem else ""])
    return rows


def headline(result: dict) -> str:
    """The headline figures per model, the on-policy rounds, and the paired comparisons of checked
    accuracy (with rounds: the last round against SFT and offline DPO; the others are in the table)."""
    ev = result["eval"]
    table = text_table(*results_table(ev.get("models", {}), HEADLINE))
    records = result.get("rounds") or []
    if records:
        last = f"round-{records[-1]['round']}"
        keep = {p: c for p, c in ev.get("comparisons", {}).items()
                if not p.startswith("round-") or p in (f"{last}-sft", f"{last}-dpo")}
        ev = {**ev, "comparisons": keep}
    return "\n".join([table, *rounds_table(records, ev.get("models")), *comparison_lines(ev, checked=True)])


def rounds_table(records: list[dict], models: dict | None = None) -> list[str]:
    """One line per on-policy round: pairs built, the samples' mean reward, held-out reward accuracy
    (against the round's reference), and the round model's held-out checked accuracy when evaluated."""
    if not records:
        return []
    lines = ["", "on-policy rounds:"]
    for r in records:
        acc = r.get("eval/rewards/accuracies")
        checked = ((models or {}).get(f"round-{r['round']}") or {}).get("checked")
        lines.append(f"  round {r['round']}: {r['prompts']} prompts x {r['samples'] // max(1, r['prompts'])} samples, "
                     f"mean reward {r['reward_mean']:.3f}, {r['pairs']} pairs ({r['ties']} ties skipped), "
                     f"held-out reward acc {'-' if acc is None else format(acc, '.3f')}"
                     + (f", checked acc {checked['accuracy']:.3f}" if checked else ""))
    return lines
