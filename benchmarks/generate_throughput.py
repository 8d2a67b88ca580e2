"""Generation throughput: preftune's batched generation (``eval.generate.generate``: the prompts' shared
prefix computed once, prompts sorted by length into left-padded batches, repeated prompts prefilled
once, finished rows dropped from the batch) against a plain per-prompt ``model.generate`` loop, on
the same model, the same prompts (the embedded held-out prompts, rendered with the chat template as
training sees them) and the same settings (greedy, or sampling with ``--temperature``).

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py                    # embedded SmolLM2
    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py --samples 4 --temperature 1  # a round's sampling
    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py --model tiny --prompts 16
    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py --precision fp32,bf16 --prompts 8 --samples 8 \
        --temperature 0.8 --max-new-tokens 32 --batch-size 128            # the demo round's shape, both precisions

``--precision`` loads the model in each of fp32 and bf16 (weights and compute) in turn. The sides
alternate (preftune, plain, preftune, ...) and each repeat prints new tokens per second
(generated ids up to the first stop token, so both sides count alike), with CPU-seconds / wall-seconds
to flag a disturbed run (about 1.95 is an undisturbed 2-thread run; below 1.6, repeat it). Medians
and the ratio of the medians close the output; ``--json`` writes them too.

``--engines builtin,vllm,openai`` instead compares preftune's generation engines (``eval/engines.py``)
side by side in one run on a round's shape (``--samples`` per prompt, ``--temperature``): each
engine's load time (starting it and serving the policy) is reported apart from its tokens/s.

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py --engines builtin,vllm --samples 8 --temperature 0.8
    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py --engines builtin,openai \
        --base-url http://127.0.0.1:8000/v1 --samples 8 --temperature 0.8 --no-seed   # vllm serve (CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def new_token_count(tokenizer, texts: list[str]) -> int:
    """Tokens of the generated texts (what both sides produced, counted the same way)."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def preftune_side(model, tok, prompts, args) -> list[str]:
    from preftune.eval.generate import generate

    return generate(model, tok, prompts, args.max_new_tokens, args.temperature, 1.0, seed=0,
                    batch_size=args.batch_size, progress=False, max_prompt_length=args.max_prompt_length)


def plain_side(model, tok, prompts, args) -> list[str]:
    """One prompt at a time through ``model.generate``, the loop a user writes first."""
    from preftune.eval.generate import cut_at_stop, prompt_ids, stop_ids

    stops = stop_ids(tok, model)
    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(p, tok, args.max_prompt_length)])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=args.temperature > 0, temperature=args.temperature or None, top_p=None,
                             top_k=None, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(cut_at_stop(seq[0, ids.shape[1]:].tolist(), stops), skip_special_tokens=True).strip())
    return out


def engine_figures(args, prompts) -> dict:
    """Each engine of ``--engines``: load time apart, then ``--repeats`` timed samplings of ``prompts``."""
    from preftune.config.validate import load_config
    from preftune.eval.engines import Sampling, make_engine
    from preftune.eval.generate import prompt_ids
    from preftune.model import resolve_model

    out: dict = {}
    for name in args.engines.split(","):
        cfg = load_config(None, [f"model={args.model}", f"generation.engine={name}", "seed=0",
                                 f"data.max_prompt_length={args.max_prompt_length}"]
                          + ([f"generation.base_url={args.base_url}"] if args.base_url else []))
        t0 = time.perf_counter()
        engine = make_engine(cfg)
        engine.load(resolve_model(args.model))
        load = time.perf_counter() - t0
        encoded = [prompt_ids(p, engine.tokenizer, args.max_prompt_length) for p in prompts]
        s = Sampling(args.max_new_tokens, args.temperature, 1.0, n=args.samples, seed=None if args.no_seed else 0,
                     batch_size=args.batch_size)
        rates = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            groups = engine.sample(encoded, s, progress=False)
            wall = time.perf_counter() - t0
            n = sum(len(c.ids) for g in groups for c in g)
            rates.append(n / wall)
            print(f"repeat {rep}  {name:8s} {n:6d} new tokens in {wall:7.2f} s = {n / wall:8.1f} tok/s")
        engine.close()
        out[name] = {"load_s": round(load, 1), "tokens_per_s": rates, "median": statistics.median(rates)}
        print(f"{name}: load {load:.1f} s, median {out[name]['median']:.1f} new tokens/s")
    return out


def timed(fn, *a) -> tuple[list[str], float, float]:
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    with torch.inference_mode():
        texts = fn(*a)
    wall = time.perf_counter() - t0
    return texts, wall, (cpu() - c0) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--samples", type=int, default=1, help="completions per prompt (a round's rounds.samples)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="comma list of: fp32, bf16")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--engines", default=None, help="compare generation engines instead: builtin,vllm,openai")
    ap.add_argument("--base-url", default=None, help="the openai engine's server, up to /v1")
    ap.add_argument("--no-seed", action="store_true", help="send no per-request seed (vLLM on CPU refuses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engines:
        from preftune.config import DataConfig
        from preftune.data.sources import load_rows

        _, test, _ = load_rows(DataConfig(), "preference", 0)
        print(f"engines {args.engines}: model {args.model}, {args.prompts} prompts x {args.samples} samples, "
              f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}")
        figures = engine_figures(args, [r.prompt for r in test[: args.prompts]])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "engines": figures}, f, indent=1)
        return

    from preftune.config import DataConfig
    from preftune.data.sources import load_rows

    _, test, _ = load_rows(DataConfig(), "preference", 0)
    prompts = [r.prompt for r in test[: args.prompts] for _ in range(args.samples)]
    print(f"model {args.model}, {args.prompts} prompts x {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}, batch {args.batch_size}, {args.threads} threads")
    results = {precision: run_precision(args, precision, prompts) for precision in args.precision.split(",")}
    print("\n| precision | preftune tok/s | plain loop tok/s | ratio | identical (greedy) |\n|---|---|---|---|---|")
    for precision, r in results.items():
        same = f"{r['identical']:.0%}" if args.temperature == 0 else "sampled"
        print(f"| {precision} | {r['median']['preftune']:.1f} | {r['median']['plain']:.1f} | {r['ratio']:.2f}x | {same} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def run_precision(args, precision: str, prompts: list) -> dict:
    """Both sides ``args.repeats`` times, alternating, with the model loaded in ``precision``."""
    from preftune.model import load_for_inference

    model, tok = load_for_inference(args.model, precision)
    sides = {"preftune": preftune_side, "plain": plain_side}
    rates: dict[str, list[float]] = {s: [] for s in sides}
    texts: dict[str, list[str]] = {}
    for rep in range(args.repeats):
        for name, fn in sides.items():
            out, wall, util = timed(fn, model, tok, prompts, args)
            n = new_token_count(tok, out)
            rates[name].append(n / wall)
            texts[name] = out
            flag = "" if util >= 1.6 or args.threads < 2 else "  (disturbed: cpu/wall below 1.6)"
            print(f"{precision} repeat {rep}  {name:9s} {n:6d} new tokens in {wall:7.2f} s = {n / wall:8.1f} tok/s  "
                  f"cpu/wall {util:.2f}{flag}", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    same = sum(a == b for a, b in zip(texts["preftune"], texts["plain"])) / len(prompts)
    ratio = med["preftune"] / med["plain"] if med["plain"] else float("nan")
    agree = (f"identical responses {same:.0%} (greedy: batching with left padding may flip a near-tie token)"
             if args.temperature == 0 else "sampled, so the responses differ")
    print(f"{precision}: median new tokens/s: preftune {med['preftune']:.1f}, plain loop {med['plain']:.1f}, "
          f"ratio {ratio:.2f}x; {agree}")
    return {"tokens_per_s": rates, "median": med, "ratio": ratio, "identical": same}


if __name__ == "__main__":
    main()
