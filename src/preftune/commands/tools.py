"""Data and serving commands: data inspect, data synth, serve, push."""

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
    """``preftune serve MODEL [--host H] [--port P] [--api-key-env VAR] [--max-tokens N]``."""
    import uvicorn  # the serve extra

    from preftune.model import load_for_inference
    from preftune.serve import check_bind, create_app

    api_key = os.environ.get(ns.api_key_env) or None
    check_bind(ns.host, api_key, ns.api_key_env)
    if ns.max_tokens < 1:
        raise PreftuneError(f"--max-tokens must be at least 1, got {ns.max_tokens}")
    model, tokenizer = load_for_inference(ns.model)
    app = create_app(model, tokenizer, ns.model, api_key, ns.max_tokens)
    auth = f"API key required (from ${ns.api_key_env})" if api_key else "no API key (loopback only)"
    print(f"preftune serve: {ns.model} at http://{ns.host}:{ns.port}/v1 ; {auth}; max_tokens cap {ns.max_tokens}")
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="info")
    return 0


def push(ns) -> int:
    """``preftune push RUN --repo NAME``: create the Hub repo and upload the model with its card."""
    from preftune.card import push_model

    folder, url = push_model(Path(ns.run), ns.repo)
    print(f"pushed {folder} -> {url}")
    return 0
