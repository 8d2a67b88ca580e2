"""Tokenization throughput: preftune's batched, cached row -> ids path (cold cache and warm cache)
against TRL 1.16's own DPO dataset preparation (``DPOTrainer._prepare_dataset``: prompt and
prompt + completion through the chat template, tokenized per row by ``datasets.map``), on the same
HH-shaped rows and the same tokenizer (SmolLM2's ChatML template).

The rows are Anthropic-HH-shaped transcripts (1-3 Human/Assistant turns, ~110 prompt tokens,
~50 per response) built from the embedded preference data with a seed, read by preftune's ``hh``
adapter; TRL gets the same rows in its conversational layout (prompt messages, chosen and rejected
assistant messages). The sides alternate in one process (TRL, cold, warm, TRL, ...), and each window
reports CPU-seconds / wall-seconds (worker processes included), so a run disturbed by other load
shows itself. Cold means an empty cache folder; warm means the entry exists and the tokenizer's
digest is recomputed, as in a fresh run.

    HF_HUB_OFFLINE=1 python benchmarks/tokenize_throughput.py --rows 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from types import SimpleNamespace


def hh_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` HH-RLHF-shaped records (``chosen``/``rejected`` transcripts sharing their prompt)."""
    from preftune.data.sources import resources_dir

    pool = [json.loads(line) for line in (resources_dir() / "prefs_train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = rng.sample(pool, rng.randint(1, 3))
        head = "".join(f"\n\nHuman: {t['prompt']}\n\nAssistant: {t['chosen']}" + " Anything else?" * rng.randint(0, 3)
                       for t in turns[:-1])
        last = turns[-1]
        head += f"\n\nHuman: {last['prompt']}" + " Please explain in detail." * rng.randint(0, 4) + f" (#{i})"
        pad = " I think it is important to be careful here." * rng.randint(1, 6)
        out.append({"chosen": f"{head}\n\nAssistant: {last['chosen']}{pad}",
                    "rejected": f"{head}\n\nAssistant: {last['rejected']}{pad}"})
    return out


class Window:
    """Wall and CPU seconds of one timed call, this process and its finished children together."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = self._cpu() - self.cpu


def run_trl(rows, tokenizer, max_length: int, num_proc: int | None) -> Window:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl import DPOConfig, DPOTrainer

    disable_progress_bar()
    ds = Dataset.from_list([{"prompt": r.prompt, "chosen": [{"role": "assistant", "content": r.chosen}],
                             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in rows])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=max_length, dataset_num_proc=num_proc,
                     report_to=[], bf16=False, use_cpu=True)
    with Window() as w:  # the in-memory dataset has no cache file, so map() always computes
        out = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), ds, tokenizer, args, "train")
    assert len(out) == len(rows)
    return w


def run_preftune(rows, tokenizer, data, cache_dir: str, cold: bool) -> Window:
    from preftune.data import cache
    from preftune.data.tokenize import RowKind

    if cold:
        shutil.rmtree(cache_dir, ignore_errors=True)
    cache._DIGESTS.clear()  # a fresh run hashes the tokenizer again
    with Window() as w:
        items, report = cache.tokenize_rows_cached(rows, tokenizer, data, RowKind.PREFERENCE, progress=False)
    assert report.kept == len(items) == len(rows), report.to_dict()
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--num-proc", type=int, default=None, help="preftune's data.num_proc (default: the cores)")
    ap.add_argument("--trl-num-proc", type=int, default=None, help="TRL's dataset_num_proc (default: its default)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("datasets").setLevel(logging.ERROR)
    from transformers import AutoTokenizer

    from preftune import embedded
    from preftune.config import DataConfig
    from preftune.data.formats import hh

    tokenizer = AutoTokenizer.from_pretrained(embedded.tokenizer_dir())
    rows = [hh(r) for r in hh_records(args.rows)]
    data = DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length, num_proc=args.num_proc)
    cache_dir = tempfile.mkdtemp(prefix="tokcache")
    os.environ["PREFTUNE_CACHE"] = cache_dir
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(rows)} HH-shaped rows, SmolLM2 tokenizer, max_length {args.max_length}, max_prompt_length "
          f"{args.max_prompt_length}, {cores} cores; TRL dataset_num_proc={args.trl_num_proc}")
    runs: dict[str, list[Window]] = {"trl": [], "cold": [], "warm": []}
    for _ in range(args.repeats):
        runs["trl"].append(run_trl(rows, tokenizer, args.max_length, args.trl_num_proc))
        runs["cold"].append(run_preftune(rows, tokenizer, data, cache_dir, cold=True))
        runs["warm"].append(run_preftune(rows, tokenizer, data, cache_dir, cold=False))
        line = ", ".join(f"{k} {len(rows) / v[-1].wall:,.0f} rows/s (cpu/wall {v[-1].cpu / v[-1].wall:.2f})"
                         for k, v in runs.items())
        print(f"  repeat: {line}")
    rate = {k: statistics.median(len(rows) / w.wall for w in v) for k, v in runs.items()}
    ratio = {k: statistics.median(t.wall / w.wall for t, w in zip(runs["trl"], runs[k])) for k in ("cold", "warm")}
    print(f"median rows/s: TRL {rate['trl']:,.0f}  preftune cold {rate['cold']:,.0f}  warm {rate['warm']:,.0f}")
    print(f"preftune / TRL (median of per-repeat ratios): cold {ratio['cold']:.1f}x, warm {ratio['warm']:.1f}x "
          "(targets: cold >= 3x, warm >= 50x)")
    shutil.rmtree(cache_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": len(rows), "cores": cores, "rows_per_s": rate, "ratio_vs_trl": ratio,
                       "cpu_per_wall": {k: [w.cpu / w.wall for w in v] for k, v in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
