"""DPO training throughput, peak memory and final loss: preftune against TRL's DPOTrainer, on the same
model, the same tokens, the same batches in the same order, fp32 and the same thread count.

Each measurement runs in a fresh process (so peak RSS is its own), and the sides alternate within
every repeat: preftune, TRL (reference model in memory), TRL with ``precompute_ref_log_probs``,
preftune, ... Only the optimizer steps after ``--warmup`` are timed; the reference precompute pass
is reported apart: seconds per pair precomputed, and per training step (``batch_size`` pairs).

    HF_HUB_OFFLINE=1 python benchmarks/dpo_throughput.py                      # tiny model, quick
    HF_HUB_OFFLINE=1 python benchmarks/dpo_throughput.py --models smollm2 --modes full,lora \\
        --batch-size 2 --steps 4 --warmup 1 --repeats 3                        # docs/speed.md's table

Tokens are counted as TRL counts them: the non-pad tokens of chosen + rejected, prompt included in
both. TRL runs without gradient checkpointing (on by default in its DPOConfig). ``--precision`` runs
both sides in each precision: ``fp32``; ``bf16-mixed`` (fp32 weights under bf16 autocast: TRL's
``bf16=True``, its default); ``bf16`` (bf16 weights, and TRL's ``bf16=True`` on them).

Both sides use torch's fused AdamW (preftune's ``optimizer: adamw_fused``, TRL's ``adamw_torch_fused``):
the default per-tensor loop is about 9% of a bf16 step on the CPU.

Each row also gives the matmul FLOPs that side computes per pair (:func:`flops_per_pair`: prompt
forwards, LM-head positions, reference passes) and its achieved GFLOP/s against the ``torch.mm`` peak of
the same precision measured in the same worker process (:func:`matmul_peak`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MODELS = {"tiny": "tiny", "smollm2": "embedded:smollm2-135m-instruct"}
SHAPES = {  # name -> (prompt words, (min, max) response words); ~1.3 SmolLM2 tokens per word of news text
    "long_prompt": (390, (48, 48)),
    "short_prompt": (100, (48, 96)),
}
SIDES = ("preftune", "trl", "trl_precompute")


@dataclass
class Spec:
    """One measurement: a side, a model, a data shape, full fine-tuning or LoRA."""

    side: str
    model: str
    shape: str
    mode: str
    pairs: int
    batch_size: int
    steps: int
    warmup: int
    threads: int
    lr: float
    data_dir: str
    precision: str = "fp32"


# ----------------------------------------------------------------------------- data
def write_pairs(folder: Path, shape: str, pairs: int, seed: int = 0) -> Path:
    """``train.jsonl`` / ``test.jsonl`` of prompts and responses cut from the Lee news corpus (real text,
    deterministic): prompt and responses are random word windows of the shape's lengths."""
    from preftune.embedded import heldout_corpus_path

    words = heldout_corpus_path().read_text().split()
    rng = random.Random(seed)
    prompt_words, (lo, hi) = SHAPES[shape]

    def window(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", pairs), ("test", max(2, pairs // 8))):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                row = {"prompt": window(prompt_words), "chosen": window(rng.randint(lo, hi)),
                       "rejected": window(rng.randint(lo, hi))}
                f.write(json.dumps(row) + "\n")
    return folder


def preftune_config(spec: Spec, out_dir: Path):
    from preftune.config.validate import config_from_dict

    return config_from_dict({
        "model": MODELS[spec.model], "seed": 0, "output_dir": str(out_dir), "threads": spec.threads,
        "precision": spec.precision,
        "data": {"source": spec.data_dir, "max_length": 2048, "max_prompt_length": 1536},
        "dpo": {"max_steps": spec.steps, "batch_size": spec.batch_size, "eval_batch_size": spec.batch_size,
                "lr": spec.lr, "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0,
                "max_grad_norm": 1.0, "beta": 0.1, "loss": "sigmoid", "log_every": 1,
                "optimizer": "adamw_fused"},
        "lora": {"enabled": spec.mode == "lora", "r": 16, "alpha": 32},
    })


# ----------------------------------------------------------------------------- workers (one process each)
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(precision: str, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` ``torch.mm`` in the precision's matmul dtype (bf16 for bf16 and
    bf16-mixed) on ``threads`` threads: the peak the achieved rate is held against. On a CPU without
    native bf16, bf16 matmuls take fp32 kernels as in a run (``model.bf16_fallback``), on both sides."""
    import torch

    from preftune.model import bf16_fallback

    bf16_fallback(precision)
    torch.set_num_threads(threads)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def summarize(step_times: list[float], step_tokens: list[int], losses: list[float], spec: Spec) -> dict:
    timed = slice(spec.warmup, None)
    seconds = sum(step_times[timed])
    return {"tokens_per_s": sum(step_tokens[timed]) / seconds,
            "pairs_per_s": spec.batch_size * len(step_times[timed]) / seconds, "step_s": statistics.median(step_times[timed]),
            "final_loss": losses[-1], "losses": losses, "peak_rss_mb": peak_rss_mb()}


def run_preftune(spec: Spec, work: Path) -> dict:
    """The real ``run_stage`` (reference = precomputed by default), step times from its metrics.jsonl."""
    import preftune.reference as refs
    from preftune.model import resolve_model
    from preftune.train import run_stage

    cfg = preftune_config(spec, work / "run")
    peak = matmul_peak(spec.precision, spec.threads)
    precompute_s = []
    plain_precompute = refs.precompute

    precompute_pairs = []

    def timed_precompute(*args, **kwargs):
        t0 = time.perf_counter()
        table = plain_precompute(*args, **kwargs)
        precompute_s.append(time.perf_counter() - t0)
        precompute_pairs.append(len(table))  # train and test pairs
        return table

    refs.precompute = timed_precompute
    run_stage(cfg, "dpo", work / "run", resolve_model(cfg.model))
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    seen = [0] + [r["tokens_seen"] for r in records]
    out = summarize([r["step_time"] for r in records], [b - a for a, b in zip(seen, seen[1:])],
                    [r["loss"] for r in records], spec)
    return out | {"precompute_s": sum(precompute_s), "precompute_pairs": sum(precompute_pairs), "mm_peak_gflops": peak}


def trl_dataset(spec: Spec):
    """preftune's own tokenized train split, in the order preftune's loop visits it, as TRL columns."""
    from datasets import Dataset

    from preftune.data.stage import load_stage_data, plan_epoch
    from preftune.model import load_tokenizer, resolve_model

    cfg = preftune_config(spec, Path(tempfile.mkdtemp()))
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    items = load_stage_data(cfg, "dpo", tokenizer).train
    per_epoch = max(1, len(plan_epoch(len(items), spec.batch_size, cfg.seed, 0)))
    order = [i for step in range(spec.steps)
             for i in plan_epoch(len(items), spec.batch_size, cfg.seed, step // per_epoch)[step % per_epoch]]
    rows = [items[i] for i in order]
    tokens = [sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids)
                  for r in rows[s : s + spec.batch_size]) for s in range(0, len(rows), spec.batch_size)]
    data = Dataset.from_dict({"prompt_ids": [r.prompt_ids for r in rows], "chosen_ids": [r.chosen_ids for r in rows],
                              "rejected_ids": [r.rejected_ids for r in rows]})
    return cfg, tokenizer, data, tokens, rows


def flops_per_pair(spec: Spec) -> dict[str, dict[str, float]]:
    """Matmul FLOPs per pair of each side, over the timed steps' batches, counted from the model's
    shapes (one multiply-add = 2 FLOPs; norms, activations and the optimizer left out):

    - decoder: the linear layers at every position each side runs (padding included), plus attention's
      ``QK^T`` and ``AV`` over the dense ``T x T`` of each row; training = forward x3 (full: input and
      weight gradients) or x2 (LoRA: input gradients only, adapters neglected);
    - LM head ``2 H V`` per position where logits are made: preftune at the scored completion tokens
      only, x4 for full (forward, recomputed in backward, grad of hidden, grad of weight) and x3 for LoRA;
      TRL at every position of its rows, x3 / x2;
    - preftune: one row per pair ``[prompt | chosen | rejected]`` (prefix-shared); TRL: two rows per pair
      (prompt + chosen, prompt + rejected) padded to the batch's longest;
    - reference: one forward pass of the same rows, inside the step for ``trl``, precomputed once
      (amortized over a one-epoch run) for ``preftune`` and ``trl_precompute``.

    Returns ``{side: {"step": FLOPs in the step per pair, "reference": FLOPs of its reference pass per pair}}``."""
    from transformers import AutoConfig

    from preftune.model import resolve_model

    *_, rows = trl_dataset(spec)
    c = AutoConfig.from_pretrained(resolve_model(MODELS[spec.model]))
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    linear = layers * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * c.intermediate_size)
    train_x, head_x = (3, 4) if spec.mode == "full" else (2, 3)

    def forward(row_lengths: list[int], head_positions: int) -> tuple[float, float]:
        decoder = sum(2 * linear * t + 4 * layers * heads * head_dim * t * t for t in row_lengths)
        return decoder, 2 * h * vocab * head_positions

    totals = {side: {"step": 0.0, "reference": 0.0} for side in SIDES}
    for s in range(0, len(rows), spec.batch_size):
        batch = rows[s : s + spec.batch_size]
        shared = max(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in batch)
        scored = sum(len(r.chosen_ids) + len(r.rejected_ids) for r in batch)
        dec, head = forward([shared] * len(batch), scored)
        totals["preftune"]["step"] += train_x * dec + head_x * head
        totals["preftune"]["reference"] += dec + head
        width = max(len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in batch)
        dec, head = forward([width] * 2 * len(batch), 2 * len(batch) * width)
        for side in ("trl", "trl_precompute"):
            totals[side]["step"] += train_x * (dec + head)
            totals[side]["reference"] += dec + head
    totals["trl"]["step"] += totals["trl"]["reference"]  # its reference runs inside every step
    return {side: {k: v / len(rows) for k, v in t.items()} for side, t in totals.items()}


def run_trl(spec: Spec, work: Path) -> dict:
    """TRL's DPOTrainer on preftune's token ids (its own tokenization skipped), sequential order."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preftune.model import load_model, resolve_model
    from preftune.train import seed_everything

    peak = matmul_peak(spec.precision, spec.threads)
    cfg, tokenizer, data, tokens, _ = trl_dataset(spec)
    seed_everything(cfg.seed)
    model = load_model(cfg, resolve_model(cfg.model), trainable=True)  # same weights, same LoRA init
    losses: list[float] = []
    step_times: list[float] = []

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized by preftune: identical ids on both sides

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

    args = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1,
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", max_steps=spec.steps, logging_steps=1, save_strategy="no", report_to="none",
        beta=0.1, loss_type=["sigmoid"], max_length=None, train_sampling_strategy="sequential", use_cpu=True,
        gradient_checkpointing=False, precompute_ref_log_probs=spec.side == "trl_precompute", seed=cfg.seed,
        bf16=spec.precision != "fp32", fp16=False,  # TRL's bf16=True is autocast: preftune's bf16-mixed
        dataloader_pin_memory=False, disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[StepTimer()])
    precompute_s = time.perf_counter() - t0 if spec.side == "trl_precompute" else 0.0
    trainer.train()
    return summarize(step_times, tokens, losses, spec) | {
        "precompute_s": precompute_s, "precompute_pairs": len(data) if spec.side == "trl_precompute" else 0,
        "mm_peak_gflops": peak}


WORKERS = {"preftune": run_preftune, "trl": run_trl, "trl_precompute": run_trl}


def worker_main(spec_json: str) -> None:
    spec = Spec(**json.loads(spec_json))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as work:
        result = WORKERS[spec.side](spec, Path(work))
    # CPU-seconds / wall-seconds over the worker's run (loading included): ~1.95 when undisturbed on
    # 2 threads; below ~1.6 another process shared the cores and the timing should be repeated.
    result["cpu_per_wall"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- orchestration
def isolated_cache() -> str:
    """A fresh PREFTUNE_CACHE sharing the converted models and tokenizers, so preftune's reference
    log-probs are recomputed (and timed) in every repeat instead of read from an earlier run."""
    from preftune.env import cache_root

    real, fresh = cache_root(), Path(tempfile.mkdtemp(prefix="dpo-bench-cache-"))
    for name in ("models", "tokenizers", "gguf-sha256.json"):
        if (real / name).exists():
            (fresh / name).symlink_to(real / name)
    return str(fresh)


def measure(spec: Spec) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PREFTUNE_CACHE": isolated_cache(), "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": str(spec.threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(spec))],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{spec.side} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report_row(name: str, results: dict[str, list[dict]], batch_size: int, flops: dict) -> list[str]:
    """Markdown rows: one per side with medians, and the preftune / TRL ratios taken pair by pair
    (repeat i of preftune against repeat i of TRL), their median.

    The precompute pass covers different pairs on each side (preftune: the train and test splits; TRL:
    the pairs of the timed steps it is given), so it is compared per pair, and amortized per step as
    ``batch_size`` pairs. GFLOP/s is the step's FLOPs per pair x pairs/s, against the matmul peak."""
    lines = []
    keys = ("tokens_per_s", "pairs_per_s", "peak_rss_mb", "final_loss", "precompute_s", "precompute_pairs",
            "mm_peak_gflops", "cpu_per_wall")
    base = {side: {k: median_of(runs, k) for k in keys} for side, runs in results.items()}
    for side, m in base.items():
        per_pair = m["precompute_s"] / m["precompute_pairs"] if m["precompute_pairs"] else 0.0
        f = flops[side]
        achieved = f["step"] * m["pairs_per_s"] / 1e9
        lines.append(f"| {name} | {side} | {m['tokens_per_s']:.0f} | {m['pairs_per_s']:.3f} | {m['peak_rss_mb']:.0f} "
                     f"| {m['final_loss']:.6f} | {per_pair:.2f} s/pair ({per_pair * batch_size:.2f} s/step) "
                     f"| {f['step'] / 1e9:.0f} + {f['reference'] / 1e9:.0f} "
                     f"| {achieved:.0f} ({achieved / m['mm_peak_gflops']:.0%} of {m['mm_peak_gflops']:.0f}) "
                     f"| {m['cpu_per_wall']:.2f} |")
    ours = results.get("preftune")
    for side in ("trl", "trl_precompute"):
        if ours and side in results:
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, results[side])]
            t = base[side]
            lines.append(f"| {name} | preftune / {side} | **{statistics.median(ratios):.2f}x** "
                         f"({', '.join(f'{r:.2f}' for r in ratios)}) | | {base['preftune']['peak_rss_mb'] / t['peak_rss_mb']:.2f}x "
                         f"| Δ {abs(base['preftune']['final_loss'] - t['final_loss']):.1e} | | | | |")
    return lines


def run_sides(name: str, spec_of, sides: list[str], repeats: int, raw: list) -> dict[str, list[dict]]:
    """Every side ``repeats`` times, alternating (and flipping the order every other repeat)."""
    results: dict[str, list[dict]] = {}
    for rep in range(repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            spec = spec_of(side)
            r = measure(spec)
            results.setdefault(side, []).append(r)
            raw.append(asdict(spec) | r)
            quiet = "" if r["cpu_per_wall"] >= 1.6 else "  [DISTURBED: cpu/wall < 1.6, repeat it]"
            print(f"{name} rep {rep} {side}: {r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb']:.0f} MiB, "
                  f"loss {r['final_loss']:.6f}, cpu/wall {r['cpu_per_wall']:.2f}{quiet}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--shapes", default="long_prompt", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--modes", default="full", help="comma list of: full, lora")
    ap.add_argument("--precision", default="fp32", help="comma list of: fp32, bf16-mixed, bf16")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma list of: " + ", ".join(SIDES))
    ap.add_argument("--pairs", type=int, default=32, help="training pairs written (one epoch = pairs / batch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--json", help="also write every raw measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a.worker)

    raw, table = [], ["| model / shape / mode / precision | side | tokens/s | pairs/s | peak RSS MiB | final loss "
                      "| reference precompute | GFLOP per pair (step + reference) | GFLOP/s (of mm peak) | cpu/wall |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
    data_root = Path(tempfile.mkdtemp(prefix="dpo-bench-data-"))
    for model in a.models.split(","):
        for shape in a.shapes.split(","):
            data_dir = write_pairs(data_root / shape, shape, a.pairs)
            for mode in a.modes.split(","):
                for precision in a.precision.split(","):
                    name = f"{model} / {shape} / {mode} / {precision}"
                    spec_of = functools.partial(Spec, model=model, shape=shape, mode=mode, pairs=a.pairs,
                                                batch_size=a.batch_size, steps=a.steps, warmup=a.warmup,
                                                threads=a.threads, lr=a.lr, data_dir=str(data_dir),
                                                precision=precision)
                    flops = flops_per_pair(spec_of("preftune"))
                    results = run_sides(name, spec_of, a.sides.split(","), a.repeats, raw)
                    table += report_row(name, results, a.batch_size, flops)
    print("\n" + "\n".join(table))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
