"""Training commands: config show, sft, dpo, orpo, merge, pipeline, quickstart, sweep."""

from __future__ import annotations

import os
from pathlib import Path

from preftune.commands import setup_logging
from preftune.config import apply_overrides, load_config, load_raw, to_yaml


def config_show(ns) -> int:
    print(to_yaml(load_config(ns.config, ns.overrides)), end="")
    return 0


def _train(ns, stage: str, extra: tuple[str, ...] = ()) -> int:
    from preftune.card import update_card
    from preftune.model import resolve_model
    from preftune.train import run_stage

    setup_logging()
    cfg = load_config(ns.config, [*extra, *ns.overrides])
    out = Path(cfg.output_dir)
    summary = run_stage(cfg, stage, out, resolve_model(cfg.model), resume=ns.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        update_card(out)  # final/ and best/ get a card (the pipeline refreshes it with eval figures)
        print(f"{stage}: {summary['steps']} steps, {summary['tokens_seen']} tokens -> {out / 'final'}")
    return 0


def sft(ns) -> int:
    return _train(ns, "sft")


def dpo(ns) -> int:
    return _train(ns, "dpo")


def orpo(ns) -> int:
    return _train(ns, "dpo", ("dpo.loss=orpo",))


def merge(ns) -> int:
    from preftune.model import merge_adapter

    out = merge_adapter(ns.run, ns.out)
    print(f"merged model written to {out}")
    return 0


def pipeline(ns) -> int:
    from preftune.pipeline import headline, run_pipeline

    setup_logging()
    cfg = load_config(ns.config, ns.overrides)
    result = run_pipeline(cfg, resume=getattr(ns, "resume", False))
    print(headline(result))
    print(f"\ntimings (s): {result['timings']}")
    print(f"report: {result['report']}")
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
