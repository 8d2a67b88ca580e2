"""Evaluation commands: ``eval`` (the suite) and its parts (rewards, winrate, heldout, tasks),
generate, chat and report. The measurements live in eval/, the report in report/."""

from __future__ import annotations

import sys
from pathlib import Path

from preftune.config import Config, to_dict
from preftune.config.validate import load_config
from preftune.errors import PreftuneError
from preftune.eval import suite
from preftune.files import write_json
from preftune.paths import RunDir
from preftune.report.table import SUITE, comparison_lines, results_table, text_table


def results_text(results: dict) -> str:
    """The ``preftune eval`` table: one row per model, then the paired win-rate comparisons."""
    text = text_table(*results_table(results.get("models", {}), SUITE))
    return "\n".join([text, *comparison_lines(results, checked=False)])


def default_models(cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """base = cfg.model, plus sft/ and dpo/ of ``cfg.output_dir`` when those runs exist; and each
    one's reward reference (sft -> base; dpo -> the SFT model it started from, else base)."""
    from preftune.model import pinned_model

    run = RunDir(cfg.output_dir)
    sft, dpo = run.stage("sft"), run.stage("dpo")
    base = pinned_model(cfg)  # cfg.model, at model_revision when one is set
    models, refs = {"base": base}, {}
    if sft.is_finished():
        models["sft"], refs["sft"] = str(sft.root), base
    if dpo.is_finished():
        models["dpo"] = str(dpo.root)
        sft_ref = run.merged_sft if (run.merged_sft / "config.json").is_file() else sft.root
        refs["dpo"] = str(sft_ref) if "sft" in models else base
    return models, refs


def parse_models(specs: list[str], defaults: dict[str, str]) -> dict[str, str]:
    """``base``/``sft``/``dpo`` (the defaults), ``NAME=PATH``, or a PATH (named after its folder)."""
    out = {}
    for spec in specs:
        if spec in defaults:
            out[spec] = defaults[spec]
        elif "=" in spec:
            name, _, path = spec.partition("=")
            out[name] = path
        elif spec in ("sft", "dpo"):
            raise PreftuneError(f"--models {spec}: no finished {spec} run in the config's output_dir")
        else:
            out[Path(spec).name or spec] = spec
    return out


def eval_suite(ns) -> int:
    """``preftune eval CONFIG [--models ...]``: writes ``<output_dir>/eval/eval.json``."""
    from preftune.eval.curve import evaluate_curve

    cfg = load_config(ns.config, ns.overrides)
    run = RunDir(cfg.output_dir)
    defaults, refs = default_models(cfg)
    models = parse_models(ns.models, defaults) if ns.models else defaults
    results = suite.evaluate_models(cfg, models, run.eval_dir, refs)
    print(results_text(results))
    if cfg.eval.curve_every and "dpo" in models and "dpo" in refs:
        curve = evaluate_curve(cfg, run.stage("dpo").root, run.eval_dir, refs["dpo"])
        print(f"curve over training: {len(curve['points'])} points, wrote {run.curve_json}")
    print(f"\nwrote {run.eval_json}")
    return 0


def _single(ns, section: str) -> Config:
    """The config with only ``section`` switched on."""
    cfg = load_config(ns.config, ns.overrides)
    cfg.eval.rewards = section == "rewards"
    cfg.eval.winrate.enabled = section == "winrate"
    cfg.eval.heldout.enabled = section == "heldout"
    if section != "tasks":
        cfg.eval.tasks = []
    return cfg


def _out(cfg: Config) -> Path:
    return RunDir(cfg.output_dir).eval_dir


def eval_rewards(ns) -> int:
    """``preftune eval rewards CONFIG --model M [--reference R]`` (default reference: cfg.model)."""
    cfg = _single(ns, "rewards")
    results = suite.evaluate_models(cfg, {"model": ns.model}, _out(cfg), {"model": ns.reference or cfg.model},
                                    json_name="rewards.json")
    r = results["models"]["model"]["rewards"]
    print(f"rewards/accuracies {r['rewards/accuracies']:.4f} ± {r['se']:.4f}  rewards/margins "
          f"{r['rewards/margins']:.4f}  (n={r['n']}, reference {ns.reference or cfg.model})")
    return 0


def eval_winrate(ns) -> int:
    """``preftune eval winrate CONFIG --model M [--against B]``: vs chosen, or head to head against B."""
    from preftune.model import load_for_inference, trust_options

    cfg = _single(ns, "winrate")
    if not ns.against:
        print(results_text(suite.evaluate_models(cfg, {"model": ns.model}, _out(cfg), json_name="winrate.json")))
        return 0
    rows = suite.winrate_rows(suite.heldout_rows(cfg), cfg.eval.winrate.per_category)
    responses = {}
    for name in (ns.model, ns.against):
        model, tok = load_for_inference(name, cfg.precision, **trust_options(cfg))
        responses[name] = suite.generations(cfg, name, model, tok, rows)
        del model
    run = suite.judge(cfg, suite.judge_items(rows, responses[ns.model], responses[ns.against]))
    result = {"models": {"model": {"winrate": suite.winrate_entry(run, ns.against)}}, "config": to_dict(cfg.eval)}
    write_json(_out(cfg) / "winrate-head-to-head.json", result)
    print(f"{ns.model} vs {ns.against}")
    print(results_text(result))
    return 0


def eval_heldout(ns) -> int:
    """``preftune eval heldout CONFIG --model M [--base B]``: NLL, ppl, bits/byte (and Δ vs B)."""
    cfg = _single(ns, "heldout")
    models = ({"base": ns.base} if ns.base else {}) | {"model": ns.model}
    print(results_text(suite.evaluate_models(cfg, models, _out(cfg), json_name="heldout.json")))
    return 0


def eval_tasks(ns) -> int:
    """``preftune eval tasks CONFIG --model M``: acc and acc_norm per task (writes tasks.json)."""
    from preftune.model import load_for_inference, trust_options

    cfg = _single(ns, "tasks")
    if not cfg.eval.tasks:
        raise PreftuneError("eval.tasks is empty; name tasks, e.g. eval.tasks=[embedded:mc]")
    model, tok = load_for_inference(ns.model, cfg.precision, **trust_options(cfg))
    tasks = suite.tasks_entry(cfg, ns.model, model, tok)
    write_json(_out(cfg) / "tasks.json", {"models": {"model": {"path": ns.model, "tasks": tasks}},
                                           "config": to_dict(cfg.eval)})
    for task, r in tasks.items():
        print(f"{task}: acc {r.get('acc', float('nan')):.4f}  acc_norm {r.get('acc_norm', float('nan')):.4f}  (n={r['n']})")
    return 0


def generate(ns) -> int:
    """``preftune generate CONFIG --model M [--out F]``: responses to the held-out prompts as JSONL."""
    from preftune.eval.generate import generate as run_generation
    from preftune.eval.generate import held_out_prompts, write_jsonl
    from preftune.model import load_for_inference, trust_options

    cfg = load_config(ns.config, ns.overrides)
    rows = held_out_prompts(cfg)
    model, tok = load_for_inference(ns.model, cfg.precision, **trust_options(cfg))
    w = cfg.eval.winrate
    responses = run_generation(model, tok, [r.prompt for r in rows], w.max_new_tokens, w.temperature, w.top_p,
                               cfg.seed, cfg.eval.batch_size, max_prompt_length=cfg.data.max_prompt_length)
    out = Path(ns.out) if ns.out else Path(cfg.output_dir) / "generations.jsonl"
    write_jsonl(out, [{"prompt": r.prompt, "response": s, "meta": r.meta} for r, s in zip(rows, responses)])
    print(f"wrote {len(rows)} generations to {out}")
    return 0


def chat(ns) -> int:
    """``preftune chat MODEL``: a terminal chat; the model is a run, adapter, model folder or embedded
    name. At a terminal the line is edited with readline, and the history is kept in the cache folder."""
    from preftune.env import cache_root
    from preftune.eval.generate import chat_loop, line_editing
    from preftune.model import load_for_inference

    model, tok = load_for_inference(ns.model)
    save = line_editing(cache_root() / "chat_history") if sys.stdin.isatty() else (lambda: None)
    try:
        chat_loop(model, tok, input, sys.stdout, ns.max_new_tokens, ns.temperature)
    finally:
        save()
    return 0


def report(ns) -> int:
    """``preftune report RUN_DIR... [--out DIR]`` (default: RUN_DIR/report for one folder, else ./report)."""
    from preftune.report.report import write_report

    out = Path(ns.out) if ns.out else (RunDir(ns.runs[0]).report_dir if len(ns.runs) == 1 else Path("report"))
    path = write_report(ns.runs, out)
    print(f"report: {path} (and {path.with_suffix('.md')})")
    return 0
