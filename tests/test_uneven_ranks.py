"""Uneven splits across ranks (torchrun, 2 CPU processes, gloo): a held-out split smaller than
world x eval_batch_size (one rank has no eval batch of its own) and a train split whose last optimizer
step has one micro-batch for two ranks. Both finish, and every figure equals one process with the
same global batch: eval figures, per-step losses, pairs and tokens, for DPO and for SFT's token mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_train import metrics, write_pairs


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_uneven_ranks_finish_and_match_one_process(tmp_path, tiny_model_dir, stage):
    data = write_pairs(tmp_path / "data", n_train=26, n_test=8)  # 13 micro-batches of 2: the 7th step has 1
    cfg_path = tmp_path / "cfg.yaml"
    section = {"epochs": 1.0, "lr": 1e-2, "warmup_ratio": 0.0, "eval_batch_size": 8, "eval_every": 3,
               "batch_size": 2}
    cfg_path.write_text(json.dumps({
        "model": str(tiny_model_dir), "data": {"source": str(data), "max_length": 64, "max_prompt_length": 32},
        "lora": {"enabled": False}, stage: section | ({"reference": "copy"} if stage == "dpo" else {}),
    }))
    env = dict(os.environ, PREFTUNE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "preftune.cli", stage, str(cfg_path), f"output_dir={one}",
                        f"{stage}.grad_accum=2"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli",
                        stage, str(cfg_path), f"output_dir={two}"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 7  # 13 micro-batches, 2 a step: the last, incomplete step is taken
    assert a[-1]["pairs_seen"] == b[-1]["pairs_seen"] == 26
    for x, y in zip(a, b):
        assert x["tokens_seen"] == y["tokens_seen"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    evals = [(x, y) for x, y in zip(a, b) if "eval/loss" in x]
    assert [x["step"] for x, _ in evals] == [3, 6, 7] and all("eval/loss" in y for _, y in evals)
    for x, y in evals:
        assert x["eval/n"] == y["eval/n"] == 8
        for k in [k for k in x if k.startswith("eval/")]:
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
    summary = json.loads((two / "run.json").read_text())
    assert summary["steps"] == 7 and summary["pairs_seen"] == 26
