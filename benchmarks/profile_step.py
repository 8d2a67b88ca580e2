"""Where one DPO optimizer step spends its time: torch.profiler over preftune's real ``train_step`` on
the throughput benchmark's data (dpo_throughput.py), the top operators by self CPU time and their share.
``--timed N`` first times N steps by CPU-seconds: on one thread, tokens per CPU-second hold on a machine
shared with other jobs, where wall-clock tokens/s do not.

    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --precision bf16-mixed --model smollm2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from dpo_throughput import Spec, preftune_config, write_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shape", default="long_prompt")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--timed", type=int, default=0, help="steps timed (CPU-seconds) before the profiled one")
    ap.add_argument("--threads", type=int, default=1, help="1: shares stay true on a shared machine (no thread waits on a descheduled peer)")
    a = ap.parse_args()
    from preftune.model import resolve_model
    from preftune.train import setup, train_step

    work = Path(tempfile.mkdtemp(prefix="profile-step-"))
    data = write_pairs(work / "data", a.shape, 4)
    spec = Spec("preftune", a.model, a.shape, a.mode, 4, a.batch_size, a.warmup + a.timed + 1, a.warmup, a.threads, 5e-6,
                str(data), a.precision)
    cfg = preftune_config(spec, work / "run")
    st = setup(cfg, "dpo", work / "run", resolve_model(cfg.model))
    for _ in range(a.warmup):
        train_step(st)
    if a.timed:
        wall0, cpu0, tokens, losses = time.perf_counter(), time.process_time(), 0, []
        for _ in range(a.timed):
            rec = train_step(st)
            tokens, losses = tokens + rec["tokens_per_s"] * rec["step_time"], losses + [rec["loss"]]
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"TIMED {a.precision} {a.mode}: {a.timed} steps, {tokens / cpu:.0f} tokens per CPU-second, "
              f"{tokens / wall:.0f} tok/s wall, cpu/wall {cpu / wall:.2f}, {a.threads} thread(s), losses {losses}")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rec = train_step(st)
    wall = time.perf_counter() - wall0
    print(f"{a.precision} {a.mode}: step {rec['step_time']:.2f} s, {rec['tokens_per_s']:.0f} tok/s, loss "
          f"{rec['loss']:.6f}, cpu/wall {(time.process_time() - cpu0) / wall:.2f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
