"""Data, serving and publishing commands: data inspect, data synth, serve, push, export, config from-trl."""

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


def from_trl(ns) -> int:
    """``preftune config from-trl FILE [--kind dpo|sft] [--out CONFIG]``: print or write the preftune
    config, checked as ``config show`` would; what could not be mapped goes to stderr."""
    import sys

    import yaml

    from preftune.config.validate import config_from_dict
    from preftune.trl_names import convert, read_flat

    tree, unmapped = convert(read_flat(ns.file), ns.kind)
    config_from_dict(tree, f"{ns.file} (converted)")  # the converted config must load
    text = f"# converted by `preftune config from-trl {ns.file}`\n" + yaml.safe_dump(tree, sort_keys=False)
    if ns.out:
        Path(ns.out).write_text(text)
        print(f"wrote {ns.out}", file=sys.stderr)
    else:
        print(text, end="")
    for line in unmapped:
        print(f"not mapped: {line}", file=sys.stderr)
    return 0
