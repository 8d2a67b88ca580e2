"""Handlers for the training commands of the CLI table: config show, losses, sft, dpo, orpo, merge."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from preftune.config import load_config, resolved_dict
from preftune.logs import setup_logging  # noqa: F401  (the commands' one logging set-up)


def config_show(ns) -> int:
    print(yaml.safe_dump(resolved_dict(load_config(ns.config, ns.overrides)), sort_keys=False), end="")
    return 0


def losses_show(ns) -> int:
    from preftune.losses import loss_table

    print(loss_table(markdown=ns.markdown))
    return 0


def _train(ns, stage: str, extra: tuple[str, ...] = ()) -> int:
    from preftune.model import resolve_model
    from preftune.train import run_stage

    setup_logging()
    cfg = load_config(ns.config, [*extra, *ns.overrides])
    out = Path(cfg.output_dir)
    summary = run_stage(cfg, stage, out, resolve_model(cfg.model), resume=ns.resume,
                        allow_changes=getattr(ns, "allow_changes", False))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{stage}: {summary['steps']} steps, {summary['tokens_seen']} tokens -> {out / 'final'}")
    return 0


def sft(ns) -> int:
    return _train(ns, "sft")


def dpo(ns) -> int:
    return _train(ns, "dpo")


def orpo(ns) -> int:
    return _train(ns, "dpo", ("dpo.loss=orpo",))


def merge(ns) -> int:
    from preftune.card import write_merged_card
    from preftune.model import merge_adapter, resolve_model

    out = merge_adapter(ns.run, ns.out)
    write_merged_card(resolve_model(ns.run), out)
    print(f"merged model written to {out}")
    return 0


def iterate(ns) -> int:
    """``preftune iterate CONFIG``: on-policy rounds from the run folder's newest policy (its DPO stage,
    else its SFT model, else ``model``)."""
    from preftune.model import resolve_model
    from preftune.pipeline import rounds_table
    from preftune.rounds import run_rounds

    setup_logging()
    cfg = load_config(ns.config, ns.overrides)
    if cfg.rounds.n < 1:
        from preftune.config import ConfigError

        raise ConfigError(["rounds.n: 'preftune iterate' runs on-policy rounds, but rounds.n is 0; set rounds.n=1 or more"],
                          ns.config)
    out = Path(cfg.output_dir)
    start = next((str(p.resolve()) for p in (out / "dpo" / "final", out / "sft" / "merged", out / "sft" / "final")
                  if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()), None)
    records = run_rounds(cfg, out, start or resolve_model(cfg.model))
    print("\n".join(rounds_table(records)).strip())
    return 0
