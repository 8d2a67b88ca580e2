"""``preftune <command> ...``: one flat table from command to handler. The handlers live in the
commands layer (``preftune.commands``) and are imported lazily (``module:function``) so ``--help`` is
instant; each takes the parsed ``argparse.Namespace``."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

CONFIG = (("config",), dict(help="YAML config file"))
OVERRIDES = (("overrides",), dict(nargs="*", help="dotted key=value overrides, e.g. dpo.beta=0.3"))
RESUME = (("--resume",), dict(action="store_true", help="continue from the newest complete checkpoint in output_dir"))
ALLOW_CHANGES = (("--allow-changes",), dict(action="store_true",
                                            help="with --resume: continue even if the config or data changed"))
OVERWRITE = (("--overwrite",), dict(action="store_true", help="replace a finished run in output_dir"))
NO_PREFLIGHT = (("--no-preflight",), dict(action="store_true", help="skip the checks run before the first step"))
TRAIN = (CONFIG, OVERRIDES, RESUME, ALLOW_CHANGES, OVERWRITE, NO_PREFLIGHT)
MODEL = (("--model",), dict(required=True, help="run folder, model/adapter folder, or embedded: name"))
OUT = (("--out",), dict(required=True, help="output path"))

# command -> (handler, help, arguments)
COMMANDS: dict[str, tuple[str, str, tuple]] = {
    "config show": ("preftune.commands.training:config_show", "print the resolved config", (CONFIG, OVERRIDES)),
    "config from-trl": (
        "preftune.commands.tools:from_trl",
        "convert a TRL / alignment-handbook recipe (YAML or JSON) into a preftune config; list what could not be mapped",
        (
            (("file",), dict(help="TRL recipe (YAML or JSON)")),
            (("--kind",), dict(choices=["dpo", "orpo", "cpo", "simpo", "kto", "sft", "rm"], default=None,
                                help="TRL's trainer (default: guessed from the keys; an assumption is said)")),
            (("--out",), dict(default=None, help="write the preftune config here (default: print it)")),
        ),
    ),
    "config from-axolotl": (
        "preftune.commands.tools:from_axolotl",
        "convert an axolotl config (DPO, IPO, ORPO, KTO, SimPO or SFT) into a preftune config",
        (
            (("file",), dict(help="axolotl config YAML")),
            (("--out",), dict(default=None, help="write the preftune config here (default: print it)")),
        ),
    ),
    "config from-llamafactory": (
        "preftune.commands.tools:from_llamafactory",
        "convert a LLaMA-Factory config (stage sft, dpo or kto) into a preftune config",
        (
            (("file",), dict(help="LLaMA-Factory config YAML")),
            (("--dataset-info",), dict(default=None, help="its dataset_info.json (default: dataset_dir beside the file)")),
            (("--out",), dict(default=None, help="write the preftune config here (default: print it)")),
        ),
    ),
    "data inspect": (
        "preftune.commands.tools:data_inspect",
        "read, tokenize and summarise a dataset: kept/dropped rows, lengths, a rendered sample",
        (
            (("target",), dict(help="config YAML or data file/folder")),
            (("overrides",), dict(nargs="*", help="dotted key=value overrides (with a config)")),
            (("--format",), dict(default=None, help="row format (default: auto-detect)")),
            (("--json",), dict(action="store_true", help="print one JSON object")),
            (("--sft",), dict(action="store_true", help="inspect as SFT data")),
        ),
    ),
    "data synth": (
        "preftune.commands.tools:data_synth",
        "regenerate the generated part of the embedded preference data",
        (
            (("--n",), dict(type=int, default=400, help="number of pairs")),
            (("--seed",), dict(type=int, default=0)),
            (("--out",), dict(required=True, help="output .jsonl")),
        ),
    ),
    "sft": ("preftune.commands.training:sft", "supervised fine-tuning", TRAIN),
    "dpo": ("preftune.commands.training:dpo", "preference training with any dpo.loss (`preftune losses` lists them)",
            TRAIN),
    "rm": ("preftune.commands.training:rm",
           "a Bradley-Terry reward model (a one-label sequence classifier) on the preference data", TRAIN),
    "bon": ("preftune.commands.training:bon",
            "best-of-n: sample rounds.samples answers per prompt, score them, write the best as SFT and best vs worst",
            (CONFIG, OVERRIDES, (("--model",), dict(default=None, help="policy to sample (default: the run's SFT model)")))),
    "check": ("preftune.commands.training:check",
              "data inspection and the preflight checks of every enabled stage, without training: one table",
              (CONFIG, OVERRIDES)),
    "losses": ("preftune.commands.training:losses_show",
               "the loss table: every dpo.loss with its parameters and reference need",
               ((("--markdown",), dict(action="store_true", help="print the loss table of docs/methods.md")),)),
    "orpo": ("preftune.commands.training:orpo", "ORPO: preference optimisation without a reference",
             TRAIN),
    "pipeline": ("preftune.commands.training:pipeline",
                 "SFT, then DPO with the SFT model as reference, then evaluation and a report", TRAIN),
    "iterate": ("preftune.commands.training:iterate", "on-policy preference rounds: sample, score, pair best vs worst, train",
                (CONFIG, OVERRIDES)),
    "quickstart": ("preftune.commands.training:quickstart", "the embedded demo: configs/quickstart.yaml",
                   (OVERRIDES, OVERWRITE, NO_PREFLIGHT)),
    "merge": (
        "preftune.commands.training:merge",
        "merge a LoRA adapter into its base model",
        ((("run",), dict(help="run folder or adapter folder")), OUT),
    ),
    "generate": (
        "preftune.commands.evaluation:generate",
        "batched generation over the held-out prompts; writes JSONL",
        (CONFIG, OVERRIDES, MODEL, (("--out",), dict(default=None, help="output .jsonl"))),
    ),
    "chat": (
        "preftune.commands.evaluation:chat",
        "chat with a model in the terminal",
        ((("model",), dict(help="run folder, model/adapter folder, or embedded: name")),
         (("--max-new-tokens",), dict(type=int, default=256)), (("--temperature",), dict(type=float, default=0.7))),
    ),
    "serve": (
        "preftune.commands.tools:serve",
        "OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models), streaming or whole",
        (
            (("model",), dict(help="run folder, model/adapter folder, or embedded: name")),
            (("--host",), dict(default="127.0.0.1")),
            (("--port",), dict(type=int, default=8000)),
            (("--api-key-env",), dict(default="PREFTUNE_API_KEY", help="env var holding the required API key")),
            (("--max-tokens",), dict(type=int, default=512, help="cap on max_tokens per request")),
            (("--max-queue",), dict(type=int, default=8, help="requests waiting or running; more get 503")),
            (("--served-model-name",), dict(default=None, help="the model id clients see (default: MODEL)")),
            (("--enable-lora",), dict(action="store_true", help="vLLM's runtime LoRA endpoints "
                                                                 "(/v1/load_lora_adapter, /v1/unload_lora_adapter)")),
            (("--request-log",), dict(default=None, help="append each request's settings to this JSONL file")),
        ),
    ),
    "eval": ("preftune.commands.evaluation:eval_suite", "run the configured evaluations for base, SFT and DPO; writes eval.json",
             (CONFIG, OVERRIDES, (("--models",), dict(nargs="*", default=None, help="models to evaluate")))),
    "eval rewards": ("preftune.commands.evaluation:eval_rewards", "held-out reward accuracy against the reference",
                     (CONFIG, OVERRIDES, MODEL, (("--reference",), dict(default=None)))),
    "eval rm": ("preftune.commands.evaluation:eval_rm",
                "a reward model's held-out accuracy, calibration by reward margin and agreement with the rule",
                (CONFIG, OVERRIDES, MODEL)),
    "eval winrate": ("preftune.commands.evaluation:eval_winrate", "judged win-rate against chosen (or another model)",
                     (CONFIG, OVERRIDES, MODEL, (("--against",), dict(default=None, help="second model")))),
    "eval heldout": ("preftune.commands.evaluation:eval_heldout", "held-out LM loss, perplexity and bits per byte",
                     (CONFIG, OVERRIDES, MODEL, (("--base",), dict(default=None)))),
    "eval tasks": ("preftune.commands.evaluation:eval_tasks", "downstream tasks through lm-evaluation-harness",
                   (CONFIG, OVERRIDES, MODEL)),
    "report": (
        "preftune.commands.evaluation:report",
        "Markdown + HTML report with plots from run or sweep folders",
        ((("runs",), dict(nargs="+", help="run or sweep folders")), (("--out",), dict(default=None))),
    ),
    "sweep": ("preftune.commands.training:sweep", "run a grid of variants with shared reference and base evaluation",
              (CONFIG, OVERRIDES, (("--dry-run",), dict(action="store_true")))),
    "study": ("preftune.commands.training:study",
              "the Cerebras DPO study: its experiments (configs/study/) as sweeps, then the findings report",
              (OVERRIDES,
               (("--embedded",), dict(action="store_true", help="the same experiments on the embedded model and data")),
               (("--only",), dict(default=None, metavar="NAME", help="one experiment: a_downstream, or its letter a")),
               (("--dry-run",), dict(action="store_true", help="print the plan offline; train nothing")),
               (("--recipes",), dict(default=None, metavar="FOLDER", help="recipe folder (default: configs/study/)")))),
    "push": ("preftune.commands.tools:push", "upload a run's model with its card (and an adapter's local base) to the Hub",
             ((("run",), dict()), (("--repo",), dict(required=True)),
              (("--base-repo",), dict(default=None, help="where an adapter's local base goes (default: REPO-base)")))),
    "export": (
        "preftune.commands.tools:export",
        "copy a run's model into a folder that loads anywhere: an adapter travels with its base",
        ((("run",), dict(help="run folder or model folder")), OUT,
         (("--base-repo",), dict(default=None, help="name the adapter's base by this Hub id instead of base/"))),
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preftune", description="Align causal language models with human preferences.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    heads = {n.split(" ", 1)[0] for n in COMMANDS if " " in n}
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (target, help_, args) in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if not tail and name in heads:
            continue  # e.g. bare `eval CONFIG`, routed in main()
        if tail:
            if head not in groups:
                extra = f"; `preftune {head} CONFIG` {COMMANDS[head][1]}" if head in COMMANDS else ""
                groups[head] = sub.add_parser(head, help=f"{head} commands{extra}",
                                              description=f"{head} commands{extra}").add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND")
            sp = groups[head].add_parser(tail, help=help_, description=help_)
        else:
            sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        for flags, kw in args:
            sp.add_argument(*flags, **kw)
        sp.set_defaults(_handler=target)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, taking ``key=value`` words after an option (``--resume dpo.lr=1e-5``) as overrides."""
    ns, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(ns, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        ns.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # `eval CONFIG` (no subcommand) runs the suite; argparse cannot mix a positional with subparsers.
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] not in {n.split(" ", 1)[1] for n in COMMANDS if n.startswith("eval ")} \
            and not argv[1].startswith("-"):
        target, help_, args = COMMANDS["eval"]
        p = argparse.ArgumentParser(prog="preftune eval", description=help_)
        p.add_argument("--debug", action="store_true")
        for flags, kw in args:
            p.add_argument(*flags, **kw)
        ns = _parse(p, argv[1:])
        ns._handler = target
    else:
        parser = _parser()
        ns = _parse(parser, argv)
        if not getattr(ns, "_handler", None):
            parser.print_help()
            return 0 if not argv else 2
    if getattr(ns, "allow_changes", False) and not getattr(ns, "resume", False):
        print("preftune: error: --allow-changes goes with --resume", file=sys.stderr)
        return 2
    module, func = ns._handler.split(":")
    from preftune.logs import setup_logging

    setup_logging()
    try:
        handler = getattr(importlib.import_module(module), func)
        rc = handler(ns)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user's errors; tracebacks only with --debug
        from preftune.errors import PreftuneError

        if debug:
            raise
        if isinstance(e, (PreftuneError, FileNotFoundError)):
            msg = str(e)
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            msg = f"no space left on device while writing {e.filename or 'a file'}; free some space or write elsewhere"
        elif isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS):
            msg = f"cannot write {e.filename or 'a file'}: {e.strerror}; fix its permissions or write elsewhere"
        else:
            msg = f"{type(e).__name__}: {e} (internal error; rerun with --debug for the traceback)"
        print(f"preftune: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
