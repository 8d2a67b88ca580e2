"""DPO on one GPU with a 1B-class model: preftune's step (prefix-shared batches, chunked log-probs,
precomputed reference) against TRL 1.16's DPOTrainer (``precompute_ref_log_probs``) on the same model,
the same token ids and the same batches in the same order, in bf16.

The model is built from a config with random weights (Llama-3.2-1B's shape by default: 1.24B
parameters), nothing comes from a hub, and the data are random token ids: throughput does not depend
on what the tokens say. Each side runs in a fresh process (its peak GPU memory is its own) under a
timeout, and a side that fails is reported, not fatal. Only optimizer steps after ``--warmup`` are
timed (``cuda.synchronize`` on both ends); the reference precompute is timed apart.

Figures per side: tokens/s counted as TRL counts them (non-pad chosen + rejected tokens, the prompt in
both), pairs/s, peak GPU memory (``max_memory_allocated``), and MFU: ``6 N`` FLOPs per token the model
actually processes (prefix-shared: ``P + C + R`` per pair; TRL: ``2P + C + R``, padding left out;
attention FLOPs left out) over the GPU's dense bf16 peak.

    python benchmarks/gpu_dpo.py --json gpu_dpo.json                       # on a GPU: the 1B run
    python benchmarks/gpu_dpo.py --size tiny --device cpu --dtype fp32 --steps 3 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SIZES = {  # LlamaConfig fields
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096),
}
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), by a substring of the name."""
PAD = 0


@dataclass
class Spec:
    side: str
    size: str
    device: str
    dtype: str
    attn: str
    pairs: int
    batch_size: int
    steps: int
    warmup: int
    prompt: int
    response: int
    lr: float
    seed: int = 0


# ----------------------------------------------------------------------------- shared by both sides
def token_pairs(spec: Spec) -> list[tuple[list[int], list[int], list[int]]]:
    """``spec.pairs`` pairs of random ids: prompts of 3/4 to 1 x ``prompt`` tokens, responses of 1/2 to
    1 x ``response``, deterministic in ``seed``; id 0 is the pad and never appears."""
    rng = random.Random(spec.seed)
    vocab = SIZES[spec.size]["vocab_size"]

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]

    return [(ids(3 * spec.prompt // 4, spec.prompt), ids(spec.response // 2, spec.response),
             ids(spec.response // 2, spec.response)) for _ in range(spec.pairs)]


def build_model(spec: Spec):
    """The random-weight model, initialised on its device in its dtype from ``seed`` (same on both sides)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SIZES[spec.size], pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(spec.seed)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.dtype]
    with torch.device(spec.device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=spec.attn, dtype=dtype)
    model.config.use_cache = False
    return model.train()


def batches_of(spec: Spec) -> list[list[int]]:
    """Pair indices of each optimizer step, in order (the run cycles through the pairs)."""
    return [[(s * spec.batch_size + i) % spec.pairs for i in range(spec.batch_size)] for s in range(spec.steps)]


class Clock:
    """Wall time of a region, with the device synchronised on both ends."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0


def peak_memory_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def optimizer_for(model, spec: Spec):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0,
                             fused=spec.device.startswith("cuda"))


# ----------------------------------------------------------------------------- preftune
def run_preftune(spec: Spec) -> dict:
    """preftune's own parts: collate_prefix_shared, SequenceLogps (chunked head), METHODS['dpo'].step,
    the reference log-probs precomputed once by the policy before training."""
    import torch

    from preftune.config import DPOConfig
    from preftune.data.collate import collate_prefix_shared, to_device
    from preftune.data.rows import TokenizedPair
    from preftune.logprobs import SequenceLogps
    from preftune.methods import METHODS, reference_logps_of

    items = [TokenizedPair(p, c, r, str(i)) for i, (p, c, r) in enumerate(token_pairs(spec))]
    model = build_model(spec)
    policy = SequenceLogps(model)
    cfg = DPOConfig(beta=0.1)
    step_batches = [to_device(collate_prefix_shared([items[i] for i in idx], PAD), spec.device)
                    for idx in batches_of(spec)]
    with Clock(spec.device) as pre:  # the policy before its first step is the reference
        reference = [reference_logps_of(policy, b) for b in step_batches]
    optimizer = optimizer_for(model, spec)
    times, losses = [], []
    for batch, ref in zip(step_batches, reference):
        with Clock(spec.device) as clock:
            loss, _ = METHODS["dpo"].step(policy, batch, cfg, ref)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(clock.seconds)
        losses.append(float(loss.detach()))
    computed = [sum(len(items[i].prompt_ids) + len(items[i].chosen_ids) + len(items[i].rejected_ids) for i in idx)
                for idx in batches_of(spec)]
    return summarize(spec, model, times, losses, computed, pre.seconds, len(step_batches) * spec.batch_size)


# ----------------------------------------------------------------------------- TRL
def pad_only_tokenizer():
    """A tokenizer TRL can pad with (id 0 = pad); the ids are fed pre-tokenized, so it encodes nothing."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": PAD, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def run_trl(spec: Spec) -> dict:
    """TRL's DPOTrainer on the same ids (its own tokenization skipped), sequential order,
    ``precompute_ref_log_probs`` (a policy built from a config has no path to load a reference copy from)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = token_pairs(spec)
    order = [i for idx in batches_of(spec) for i in idx]
    data = Dataset.from_dict({"prompt_ids": [rows[i][0] for i in order], "chosen_ids": [rows[i][1] for i in order],
                              "rejected_ids": [rows[i][2] for i in order]})
    model = build_model(spec)
    losses: list[float] = []
    times: list[float] = []
    clock = Clock(spec.device)

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already token ids: identical on both sides

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # preftune's order, on any transformers 5

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            clock.__enter__()

        def on_step_end(self, *args, **kwargs):
            clock.__exit__()
            times.append(clock.seconds)

    cuda = spec.device.startswith("cuda")
    args = DPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"trl-{os.getpid()}"),
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1, learning_rate=spec.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch", max_steps=spec.steps, logging_steps=1,
        save_strategy="no", report_to="none", beta=0.1, loss_type=["sigmoid"], max_length=None,
        use_cpu=not cuda, gradient_checkpointing=False,
        precompute_ref_log_probs=True, precompute_ref_batch_size=spec.batch_size, seed=spec.seed,
        bf16=spec.dtype == "bf16", fp16=False, dataloader_pin_memory=False, disable_tqdm=True,
    )
    with Clock(spec.device) as pre:
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=pad_only_tokenizer(),
                          callbacks=[StepTimer()])
    trainer.train()
    computed = [sum(2 * len(rows[i][0]) + len(rows[i][1]) + len(rows[i][2]) for i in idx)
                for idx in batches_of(spec)]
    return summarize(spec, model, times, losses, computed, pre.seconds, len(data))


# ----------------------------------------------------------------------------- figures
def peak_flops(device: str) -> tuple[float | None, str]:
    import torch

    if not device.startswith("cuda"):
        return None, "cpu"
    name = torch.cuda.get_device_name()
    override = os.environ.get("PEAK_TFLOPS")
    if override:
        return float(override) * 1e12, name
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12, name
    return None, name


def summarize(spec: Spec, model, times: list[float], losses: list[float], computed: list[int],
              precompute_s: float, precompute_pairs: int) -> dict:
    """Figures over the timed steps (after ``warmup``)."""
    rows = token_pairs(spec)
    trl_tokens = [sum(2 * len(rows[i][0]) + len(rows[i][1]) + len(rows[i][2]) for i in idx)
                  for idx in batches_of(spec)]
    timed = slice(spec.warmup, None)
    seconds = sum(times[timed])
    params = sum(p.numel() for p in model.parameters())
    peak, device_name = peak_flops(spec.device)
    computed_per_s = sum(computed[timed]) / seconds
    return {
        "tokens_per_s": sum(trl_tokens[timed]) / seconds,
        "pairs_per_s": spec.batch_size * len(times[timed]) / seconds,
        "computed_tokens_per_s": computed_per_s,
        "step_s_median": statistics.median(times[timed]),
        "peak_gpu_memory_gib": peak_memory_gib(spec.device),
        "mfu": 6 * params * computed_per_s / peak if peak else None,
        "params": params,
        "device_name": device_name,
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "reference_precompute_s": precompute_s,
        "reference_precompute_pairs": precompute_pairs,
    }


# ----------------------------------------------------------------------------- orchestration
WORKERS = {"preftune": run_preftune, "trl": run_trl}


def measure(spec: Spec, timeout: float) -> dict:
    """One side in a fresh process; ``{"error": ...}`` when it fails or runs out of time."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(spec))]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def ratios(ours: dict, theirs: dict) -> dict:
    if "error" in ours or "error" in theirs:
        return {}
    out = {"tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
           "pairs_per_s": ours["pairs_per_s"] / theirs["pairs_per_s"]}
    if ours["peak_gpu_memory_gib"] and theirs["peak_gpu_memory_gib"]:
        out["peak_gpu_memory"] = ours["peak_gpu_memory_gib"] / theirs["peak_gpu_memory_gib"]
    if ours["final_loss"] is not None and theirs["final_loss"] is not None:
        out["final_loss_abs_diff"] = abs(ours["final_loss"] - theirs["final_loss"])
    return out


def report(results: dict) -> str:
    lines = ["| side | tokens/s | pairs/s | peak GPU GiB | MFU | final loss | reference precompute s |",
             "|---|---|---|---|---|---|---|"]
    for side in WORKERS:
        r = results.get(side)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:200]} | | | | | |")
            continue
        mem = f"{r['peak_gpu_memory_gib']:.1f}" if r["peak_gpu_memory_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {side} | {r['tokens_per_s']:.0f} | {r['pairs_per_s']:.2f} | {mem} | {mfu} | "
                     f"{r['final_loss']:.6f} | {r['reference_precompute_s']:.1f} |")
    ratio = results.get("preftune/trl") or {}
    if ratio:
        mem = f"{ratio['peak_gpu_memory']:.2f}x" if "peak_gpu_memory" in ratio else "-"
        loss = f"Δ {ratio['final_loss_abs_diff']:.1e}" if "final_loss_abs_diff" in ratio else "-"
        lines.append(f"| preftune / trl | **{ratio['tokens_per_s']:.2f}x** | {ratio['pairs_per_s']:.2f}x | {mem} | | "
                     f"{loss} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--attn", default="sdpa", help="attn_implementation of both sides")
    ap.add_argument("--sides", default="preftune,trl")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512, help="longest prompt, tokens")
    ap.add_argument("--response", type=int, default=128, help="longest response, tokens")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per side")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        spec = Spec(**json.loads(a.worker))
        print("RESULT " + json.dumps(WORKERS[spec.side](spec)), flush=True)
        return
    if a.warmup >= a.steps:
        ap.error(f"--warmup {a.warmup} leaves no timed step of --steps {a.steps}")
    results: dict = {"settings": vars(a) | {"model": SIZES[a.size]}}
    for side in a.sides.split(","):
        spec = Spec(side, a.size, a.device, a.dtype, a.attn, a.pairs, a.batch_size, a.steps, a.warmup, a.prompt,
                    a.response, a.lr)
        t0 = time.perf_counter()
        results[side] = measure(spec, a.timeout)
        print(f"{side}: {time.perf_counter() - t0:.0f} s, "
              + (results[side]["error"] if "error" in results[side] else
                 f"{results[side]['tokens_per_s']:.0f} tok/s, {results[side]['pairs_per_s']:.2f} pairs/s"),
              flush=True)
    if "preftune" in results and "trl" in results:
        results["preftune/trl"] = ratios(results["preftune"], results["trl"])
    print("\n" + report(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    failed = [side for side in a.sides.split(",") if "error" in results[side]]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
