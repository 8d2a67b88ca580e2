"""Handlers for the training commands of the CLI table: config show, sft, dpo, orpo, merge."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from preftune.config import load_config, to_yaml


def setup_logging() -> None:
    logging.basicConfig(format="preftune: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "accelerate", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
