"""One on-policy round of the demo's shape through a generation engine, beside the builtin engine: the
engine's load time, its sampling tokens/s, the round's parity figures and the round's time, for
``make vllm-check`` (``--engine openai`` against ``vllm serve``) and ``benchmarks/gpu_check.sh``
(``--engine vllm`` in-process).

    HF_HUB_OFFLINE=1 python benchmarks/engine_round.py --engine vllm
    HF_HUB_OFFLINE=1 python benchmarks/engine_round.py --engine openai --base-url http://127.0.0.1:8000/v1 --no-seed

The round starts from a LoRA adapter on the model (``--start``, default: a fresh adapter written to the
output folder, zero-initialised as LoRA starts, so it is the model itself) and keeps training it
(``rounds.reference: sft``), so a server serving the model takes each round's policy as an adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def fresh_adapter(model: str, out: Path, r: int) -> str:
    """A LoRA adapter on ``model`` as training starts one (B = 0: the model itself), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not (out / "adapter_config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(model)
        get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")).save_pretrained(out)
    return str(out.resolve())


def one_round(engine: str, args, start: str, out: Path) -> dict:
    from preftune.config.validate import load_config
    from preftune.data.sources import load_rows
    from preftune.eval import engines
    from preftune.rounds import run_round

    over = [f"model={args.model}", f"output_dir={out}", f"generation.engine={engine}", "rounds.n=1",
            "rounds.reference=sft", f"rounds.prompts={args.prompts}", f"rounds.samples={args.samples}",
            f"rounds.max_new_tokens={args.max_new_tokens}", "rounds.temperature=0.8", "rounds.reward=rule",
            f"lora.r={args.lora_r}", "eval.heldout.enabled=false", "data.max_eval_rows=16"]
    if engine == "openai":
        over += [f"generation.base_url={args.base_url}", f"generation.send_seed={not args.no_seed}",
                 f"generation.concurrency={args.concurrency}"]
    cfg = load_config(None, over)
    timing: dict = {}
    t0 = time.perf_counter()
    e = engines.make_engine(cfg)
    timing["start_s"] = time.perf_counter() - t0
    load, sample = e.load, e.sample

    def timed_load(policy):  # the engine's start and its sampling, timed apart from the rest of the round
        t = time.perf_counter()
        load(policy)
        timing["load_s"] = timing["start_s"] + time.perf_counter() - t

    def timed_sample(prompts, s, progress=True):
        t = time.perf_counter()
        groups = sample(prompts, s, progress)
        timing["sample_s"] = time.perf_counter() - t
        timing["new_tokens"] = sum(len(c.ids) for g in groups for c in g)
        return groups

    e.load, e.sample = timed_load, timed_sample
    train, heldout, _ = load_rows(cfg.data, "preference", cfg.seed)
    t0 = time.perf_counter()
    try:
        rec = run_round(cfg, 1, start, train, heldout, out, e)
    finally:
        e.close()
    return {"engine": engine, "round_s": round(time.perf_counter() - t0, 1), "load_s": round(timing["load_s"], 1),
            "sample_s": round(timing["sample_s"], 2), "new_tokens": timing["new_tokens"],
            "tokens_per_s": round(timing["new_tokens"] / timing["sample_s"], 1), "parity": rec["parity"],
            "pairs": rec["pairs"], "reward_mean": rec["reward_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("vllm", "openai"), required=True)
    ap.add_argument("--base-url", default=None, help="openai: the server, up to /v1")
    ap.add_argument("--no-seed", action="store_true", help="send no per-request seed (vLLM on CPU refuses one)")
    ap.add_argument("--concurrency", type=int, default=32, help="openai: requests in flight (vLLM batches them)")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--start", default=None, help="the round's starting adapter (default: a fresh one)")
    ap.add_argument("--out", default="engine_round")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from preftune.model import resolve_model

    out = Path(args.out).resolve()
    start = args.start or fresh_adapter(resolve_model(args.model), out / "start", args.lora_r)
    results = [one_round(args.engine, args, start, out / args.engine)]
    if not args.skip_builtin:
        results.append(one_round("builtin", args, start, out / "builtin"))
    for r in results:
        p = r["parity"] or {}
        par = (f"parity mean |gap| {p['mean_abs_gap']:.2e} max {p['max_abs_gap']:.2e} nats/token over {p['tokens']} "
               f"tokens, prompt ids {p['prompt_ids']}") if p else "parity: the policy itself"
        print(f"{r['engine']:8s} load {r['load_s']:6.1f} s  sampling {r['new_tokens']} tokens in {r['sample_s']:.1f} s "
              f"= {r['tokens_per_s']:.1f} tok/s  round {r['round_s']:.1f} s  pairs {r['pairs']}  {par}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # vLLM starts its workers by spawn: this module must be importable without running
    main()
