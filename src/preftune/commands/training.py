"""Training commands: config show, losses, sft, dpo, rm, bon, orpo, check, merge, pipeline, quickstart, iterate, sweep,
study."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from preftune.commands import setup_logging
from preftune.config import ConfigError, apply_overrides, load_raw
from preftune.config.validate import load_config, resolved_dict


def config_show(ns) -> int:
    """The resolved config, each loss with all its parameters."""
    print(yaml.safe_dump(resolved_dict(load_config(ns.config, ns.overrides)), sort_keys=False), end="")
    return 0


def losses_show(ns) -> int:
    from preftune.losses import loss_table

    print(loss_table(markdown=ns.markdown))
    return 0


def _config(ns, extra: tuple[str, ...] = ()):
    """The command's config, its ``output_dir`` pattern (``runs/{name}-{time}``) made a folder: a new
    one, or with ``--resume`` the newest it matches."""
    from preftune.paths import output_dir_for

    cfg = load_config(ns.config, [*extra, *ns.overrides])
    out = output_dir_for(cfg.output_dir, Path(str(ns.config)).stem, new=not getattr(ns, "resume", False))
    return dataclasses.replace(cfg, output_dir=out)


def _stage_options(ns) -> dict:
    return {"overwrite": getattr(ns, "overwrite", False), "preflight": not getattr(ns, "no_preflight", False)}


def _train(ns, stage: str, extra: tuple[str, ...] = ()) -> int:
    from preftune.card import update_card
    from preftune.model import model_folder
    from preftune.paths import StageDir
    from preftune.train import run_stage

    setup_logging()
    cfg = _config(ns, extra)
    out = Path(cfg.output_dir)
    summary = run_stage(cfg, stage, out, model_folder(cfg), resume=ns.resume,
                        allow_changes=getattr(ns, "allow_changes", False), **_stage_options(ns))
    if int(os.environ.get("RANK", "0")) == 0:
        update_card(out)  # final/ and best/ get a card (the pipeline refreshes it with eval figures)
        print(f"{stage}: {summary['steps']} steps, {summary['tokens_seen']} tokens -> {StageDir(out).final}")
        _push_after(cfg, out)
    return 0


def _push_after(cfg, run: Path) -> None:
    """``push_to``: upload the finished run's model with its card, as ``preftune push`` does."""
    if cfg.push_to:
        from preftune.export import push_model

        folder, url, base = push_model(run, cfg.push_to)
        print(f"pushed {folder} -> {url}" + (f" (its base -> {base})" if base else ""))


def sft(ns) -> int:
    return _train(ns, "sft")


def dpo(ns) -> int:
    return _train(ns, "dpo")


def rm(ns) -> int:
    """``preftune rm CONFIG``: a Bradley-Terry reward model on the preference data (``rm`` settings)."""
    return _train(ns, "rm")


def bon(ns) -> int:
    """``preftune bon CONFIG [--model M]``: best-of-n samples of the run's SFT model (else ``model``) into
    ``output_dir/bon``, scored by ``rounds.reward``."""
    from preftune.bon import run_bon
    from preftune.model import resolve_model
    from preftune.paths import RunDir

    setup_logging()
    cfg = load_config(ns.config, ns.overrides)
    run = RunDir(cfg.output_dir)
    newest = (run.merged_sft, run.stage("sft").final)
    start = ns.model or next((str(p.resolve()) for p in newest if (p / "config.json").is_file()
                              or (p / "adapter_config.json").is_file()), None)
    summary = run_bon(cfg, resolve_model(start or cfg.model), run.bon.root)
    r = summary["rewards"]
    print(f"bon: {summary['prompts']} prompts x {summary['n']} samples -> {summary['sft_rows']} SFT rows, "
          f"{summary['pairs']} pairs; {summary['all_tied']} prompts all tied, {summary['unscored']} unscored")
    print(f"rewards: mean {r.get('mean', float('nan')):.3f}, best mean {r.get('best_mean', float('nan')):.3f}, "
          f"worst mean {r.get('worst_mean', float('nan')):.3f} -> {run.bon.root}")
    return 0


def orpo(ns) -> int:
    return _train(ns, "dpo", ("dpo.loss=orpo",))


def check(ns) -> int:
    """``preftune check CONFIG``: read and tokenize each enabled stage's data, load its model and run the
    preflight checks on its first batch, without training; one table. Exit 2 when a check failed."""
    from preftune.pipeline import check_stages
    from preftune.report.table import text_table

    setup_logging()
    rows = check_stages(load_config(ns.config, ns.overrides))
    print(text_table(["stage", "check", "ok", "value", "tolerance", "note"], rows))
    failed = [r for r in rows if r[2] == "FAILED"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed" + (": the run would stop at "
          f"{failed[0][0]} {failed[0][1]}" if failed else ""))
    return 2 if failed else 0


def merge(ns) -> int:
    from preftune.card import write_merged_card
    from preftune.model import merge_adapter, resolve_model

    out = merge_adapter(ns.run, ns.out)
    write_merged_card(resolve_model(ns.run), out)
    print(f"merged model written to {out}")
    return 0


def pipeline(ns) -> int:
    from preftune.pipeline import headline, run_pipeline

    setup_logging()
    cfg = _config(ns)
    result = run_pipeline(cfg, resume=getattr(ns, "resume", False), allow_changes=getattr(ns, "allow_changes", False),
                          **_stage_options(ns))
    print(headline(result))
    print(f"\ntimings (s): {result['timings']}")
    print(f"report: {result['report']}")
    _push_after(cfg, Path(cfg.output_dir))
    return 0


def quickstart(ns) -> int:
    from preftune.pipeline import QUICKSTART

    ns.config = str(QUICKSTART)
    return pipeline(ns)


def sweep(ns) -> int:
    """``preftune sweep CONFIG [key=value ...] [--dry-run]``."""
    from preftune.sweep import run_sweep

    setup_logging()
    raw = apply_overrides(load_raw(ns.config), list(ns.overrides))
    run_sweep(raw, dry_run=ns.dry_run, source=str(ns.config))
    return 0


def study(ns) -> int:
    """``preftune study [key=value ...] [--embedded] [--only NAME] [--dry-run] [--recipes FOLDER]``."""
    from preftune.study import RECIPES, run_study

    setup_logging()
    run_study(Path(ns.recipes) if ns.recipes else RECIPES, only=ns.only, dry_run=ns.dry_run, embedded=ns.embedded,
              overrides=list(ns.overrides))
    return 0


def iterate(ns) -> int:
    """``preftune iterate CONFIG``: on-policy rounds from the run folder's newest policy (its DPO stage,
    else its SFT model, else ``model``)."""
    from preftune.model import model_folder
    from preftune.paths import RunDir
    from preftune.pipeline import rounds_table
    from preftune.rounds import run_rounds

    setup_logging()
    cfg = load_config(ns.config, ns.overrides)
    if cfg.rounds.n < 1:
        raise ConfigError(["rounds.n: 'preftune iterate' runs on-policy rounds, but rounds.n is 0; set rounds.n=1 "
                           "or more"], ns.config)
    run = RunDir(cfg.output_dir)
    newest = (run.stage("dpo").final, run.merged_sft, run.stage("sft").final)
    start = next((str(p.resolve()) for p in newest
                  if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()), None)
    records = run_rounds(cfg, run.root, start or model_folder(cfg))
    print("\n".join(rounds_table(records)).strip())
    return 0
