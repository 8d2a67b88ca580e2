"""Data, serving and publishing commands: data inspect, data synth, serve, push, export, config from-trl /
from-axolotl / from-llamafactory."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from preftune.errors import PreftuneError


def data_inspect(ns) -> int:
    """``preftune data inspect TARGET [k=v ...] [--format F] [--json] [--sft]``."""
    from preftune.data.inspect import inspect, load_tokenizer_for, render_text, resolve

    target = getattr(ns, "data_target", None) or ns.target
    cfg, data = resolve(target, list(ns.overrides or []), ns.format, ns.sft)
    kind = "sft" if ns.sft else "preference"
    summary = inspect(cfg, data, kind, load_tokenizer_for(cfg))
    print(json.dumps(summary, ensure_ascii=False) if ns.json else render_text(summary))
    return 0


def data_synth(ns) -> int:
    """``preftune data synth --n N --seed S --out FILE``: write the generated pairs, print the count per category."""
    from preftune.data.synth import CATEGORIES, generate, write_jsonl

    rows = generate(ns.n, ns.seed)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    counts = Counter(r["meta"]["category"] for r in rows)
    for category in CATEGORIES:
        print(f"{category:<12}{counts.get(category, 0):>6}")
    print(f"{'total':<12}{len(rows):>6}  -> {out}")
    return 0


def serve(ns) -> int:
    """``preftune serve MODEL [--host H] [--port P] [--api-key-env VAR] [--max-tokens N] [--max-queue N]
    [--served-model-name NAME]``. Every setting is checked, and the port bound, before the model loads."""
    import uvicorn

    from preftune.model import load_for_inference
    from preftune.serve import check_bind, create_app, listen

    api_key = os.environ.get(ns.api_key_env) or None
    check_bind(ns.host, api_key, ns.api_key_env)
    max_queue = getattr(ns, "max_queue", 8)
    for flag, value in (("--max-tokens", ns.max_tokens), ("--max-queue", max_queue)):
        if value < 1:
            raise PreftuneError(f"{flag} must be at least 1, got {value}")
    name = getattr(ns, "served_model_name", None) or ns.model
    sock = listen(ns.host, ns.port)
    try:
        model, tokenizer = load_for_inference(ns.model)
        app = create_app(model, tokenizer, name, api_key, ns.max_tokens, max_queue=max_queue)
        auth = f"API key required (from ${ns.api_key_env})" if api_key else "no API key (loopback only)"
        print(f"preftune serve: {ns.model} as {name!r} at http://{ns.host}:{sock.getsockname()[1]}/v1 ; {auth}; "
              f"max_tokens cap {ns.max_tokens}; queue {max_queue}", flush=True)
        uvicorn.Server(uvicorn.Config(app, host=ns.host, port=ns.port, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def push(ns) -> int:
    """``preftune push RUN --repo NAME [--base-repo NAME]``: upload the model with its card, and an
    adapter's local base (the pipeline's merged SFT model) to ``--base-repo`` (default ``NAME-base``)."""
    from preftune.export import push_model

    folder, url, base = push_model(Path(ns.run), ns.repo, getattr(ns, "base_repo", None))
    if base:
        print(f"pushed the adapter's base -> {base}")
    print(f"pushed {folder} -> {url}")
    return 0


def export(ns) -> int:
    """``preftune export RUN --out DIR [--base-repo ID]``: a folder that loads anywhere."""
    from preftune.export import BASE
    from preftune.export import export as export_model

    out = export_model(ns.run, ns.out, ns.base_repo)
    base = " (with its base in base/)" if (out / BASE).is_dir() else ""
    print(f"exported {ns.run} -> {out}{base}")
    return 0


def _write_conversion(ns, conv, command: str) -> int:
    """Check the converted config as ``config show`` would, then print or write it; the notes (an
    assumed trainer) and what could not be mapped go to stderr as well as into the file's header."""
    import sys

    from preftune.config.validate import config_from_dict

    config_from_dict(conv.tree, f"{ns.file} (converted)")  # the converted config must load
    text = conv.text(command)
    if ns.out:
        Path(ns.out).write_text(text)
        print(f"wrote {ns.out} ({conv.kind})", file=sys.stderr)
    else:
        print(text, end="")
    for line in conv.notes:
        print(f"NOTE: {line}", file=sys.stderr)
    for line in conv.unmapped:
        print(f"not mapped: {line}", file=sys.stderr)
    return 0


def from_trl(ns) -> int:
    """``preftune config from-trl FILE [--kind dpo|orpo|cpo|simpo|kto|sft|rm] [--out CONFIG]``: a TRL or
    alignment-handbook recipe as a preftune config, with TRL's defaults for what it leaves out."""
    from preftune.recipes import convert_trl, read_recipe

    conv = convert_trl(read_recipe(ns.file, "from-trl"), ns.kind)
    kind = f" --kind {ns.kind}" if ns.kind else ""
    return _write_conversion(ns, conv, f"preftune config from-trl {ns.file}{kind}")


def from_axolotl(ns) -> int:
    """``preftune config from-axolotl FILE [--out CONFIG]``: an axolotl config as a preftune config."""
    from preftune.recipes import convert_axolotl, read_recipe

    return _write_conversion(ns, convert_axolotl(read_recipe(ns.file, "from-axolotl")),
                             f"preftune config from-axolotl {ns.file}")


def from_llamafactory(ns) -> int:
    """``preftune config from-llamafactory FILE [--dataset-info JSON] [--out CONFIG]``: a LLaMA-Factory
    config (its dataset names looked up in dataset_info.json) as a preftune config."""
    from preftune.recipes import convert_llamafactory, read_recipe

    info = Path(ns.dataset_info) if ns.dataset_info else None
    conv = convert_llamafactory(read_recipe(ns.file, "from-llamafactory"), info, Path(ns.file).parent)
    return _write_conversion(ns, conv, f"preftune config from-llamafactory {ns.file}")
