"""Distribution: the launcher's intent is honoured or refused (never silently downgraded), and
``accelerate launch`` with the shipped configs on 2 CPU processes (gloo) trains exactly as one process
with the same global batch: DDP, FSDP2 and DeepSpeed ZeRO-2/3 for SFT and DPO (full fine-tuning), and
LoRA under FSDP2 and ZeRO-3 resumed from their sharded checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune import distributed
from preftune.errors import PreftuneError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
LAUNCHER_VARS = ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION",
                 "FSDP_VERSION", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "RANK")

# SFT then DPO (on the SFT model) in one launch, as the pipeline chains them: argv = config, out, stop_at, resume
DRIVER = """
import json, sys
from pathlib import Path
from preftune.config.validate import config_from_dict
from preftune.train import run_stage
raw, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
cfg, model = config_from_dict(raw), raw["model"]
if cfg.sft.enabled:
    run_stage(cfg, "sft", out / "sft", model, resume=sys.argv[4] == "1")  # relaunched: finished, nothing to do
    model = str(out / "sft" / "final")
run_stage(cfg, "dpo", out / "dpo", model, resume=sys.argv[4] == "1", stop_at=int(sys.argv[3]) or None)
"""


# ---------------------------------------------------------------- the launcher's intent (no processes)


@pytest.fixture
def launcher_env(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_intent_is_read_from_what_accelerate_launch_sets(launcher_env):
    """accelerate's FSDP launcher (ACCELERATE_USE_FSDP, FSDP_VERSION, torchrun's WORLD_SIZE) reads as
    FSDP2 over 2 processes; torchrun alone is DDP; nothing at all is one process."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "ACCELERATE_MIXED_PRECISION": "no"}
    got = distributed.launcher_intent(env)
    assert (got.type, got.world_size, got.fsdp_version, got.mixed_precision) == ("FSDP", 2, 2, "no")
    assert distributed.launcher_intent({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}).type == "DDP"
    assert distributed.launcher_intent({}).type == "NO"
    assert distributed.launcher_intent({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "4"}).type == "DEEPSPEED"


def test_mixed_precision_is_honoured_or_refused():
    """The launcher's bf16 runs a bf16-mixed config and stops an fp32 one (naming both fixes); its
    default ``no`` defers to the config; fp16 and fp8, which preftune does not train in, stop."""
    assert distributed.mixed_precision_for("bf16-mixed", "bf16") == "bf16"
    assert distributed.mixed_precision_for("bf16-mixed", "no") == "bf16"
    assert distributed.mixed_precision_for("fp32", None) == "no"
    with pytest.raises(PreftuneError, match="precision=bf16-mixed, or launch with --mixed_precision no"):
        distributed.mixed_precision_for("fp32", "bf16")
    for mp in ("fp16", "fp8"):
        with pytest.raises(PreftuneError, match=f"mixed_precision {mp}"):
            distributed.mixed_precision_for("bf16-mixed", mp)


def test_single_process_launcher_asked_for_many_stops(launcher_env):
    """``accelerate launch --cpu --num_processes 2`` starts one process with MASTER_ADDR set and no
    rank: the run stops and names the launchers that do start N CPU processes."""
    launcher_env.setenv("ACCELERATE_USE_CPU", "True")
    launcher_env.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(PreftuneError, match="starts ONE process.*--multi_gpu --num_processes N"):
        distributed.make_accelerator("fp32", 1)


def test_fsdp1_on_cpu_stops(launcher_env):
    """FSDP version 1 cannot run on CPU processes: a clear error, not DDP in its place."""
    launcher_env.setenv("ACCELERATE_USE_FSDP", "true")
    launcher_env.setenv("FSDP_VERSION", "1")
    with pytest.raises(PreftuneError, match="set fsdp_version: 2"):
        distributed.make_accelerator("fp32", 1)


def test_one_process_describes_itself(launcher_env):
    acc = distributed.make_accelerator("fp32", 1)
    assert distributed.describe(acc) | {"backend": None} == {
        "type": "NO", "world_size": 1, "mixed_precision": "no", "device": acc.device.type, "backend": None}


# ---------------------------------------------------------------- 2 CPU processes against 1


def _write_pairs(folder: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """Arithmetic pairs whose chosen answers all have the same token count (single-digit sums), so the
    SFT token mean of any split of a batch is the batch's token mean."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, off in (("train", n_train, 0), ("test", n_test, 100)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(off, off + n):
                a, b = i % 4 + 1, i % 5 + 1
                f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                    "rejected": f"{a} + {b} = {a + b + 1 + i % 3}, I think."}) + "\n")
    return folder


def _config(tmp: Path, model: Path, lora: bool, batch: int) -> dict:
    stage = {"batch_size": batch, "lr": 1e-2, "warmup_ratio": 0.0, "eval_batch_size": 4, "log_every": 1}
    return {
        "model": str(model), "seed": 0,
        "data": {"source": str(_write_pairs(tmp / "data")), "max_length": 64, "max_prompt_length": 32},
        "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "sft": {"enabled": not lora, "max_steps": 2, **stage},
        "dpo": {"max_steps": 4 if lora else 3, "save_every": 2 if lora else 0, "reference": "adapter" if lora else "copy",
                **stage},
    }


def _launch(tmp: Path, cfg: dict, out: Path, launcher: list[str], stop_at: int = 0, resume: bool = False):
    (tmp / "driver.py").write_text(DRIVER)
    cfg_path = out.with_suffix(".json")
    cfg_path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env |= {"PREFTUNE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([*launcher, str(tmp / "driver.py"), str(cfg_path), str(out), str(stop_at), str(int(resume))],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def _accelerate(config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_trajectory(one: Path, two: Path, steps: int) -> None:
    """One line per step (rank 0 alone writes), the same losses within 1e-5 and summed pairs_seen."""
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in b] == list(range(1, steps + 1)) == [m["step"] for m in a]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["pairs_seen"] == x["pairs_seen"] and y["tokens_seen"] == x["tokens_seen"]
    assert abs(a[-1]["loss"] - a[0]["loss"]) > 1e-2  # training moved, so a broken sync would show


@pytest.fixture(scope="module")
def full_one(tmp_path_factory, tiny_model_dir):
    """One process, global batch 4: SFT 2 steps, then DPO 3 steps (full fine-tuning, copy reference)."""
    tmp = tmp_path_factory.mktemp("full")
    _launch(tmp, _config(tmp, tiny_model_dir, lora=False, batch=4), tmp / "one", [sys.executable])
    return tmp


def _needs_deepspeed(*args):
    missing = importlib.util.find_spec("deepspeed") is None
    return pytest.param(*args, marks=pytest.mark.skipif(missing, reason="deepspeed is not installed (the dev extra)"))


@pytest.mark.e2e
@pytest.mark.parametrize("config,kind,extra", [
    ("ddp.yaml", "DDP", ()),
    ("fsdp.yaml", "FSDP", ()),
    # ZeRO-2 without its optimizer offload: DeepSpeedCPUAdam is a C++ op compiled on first use
    _needs_deepspeed("deepspeed_zero2_offload.yaml", "DEEPSPEED", ("--offload_optimizer_device", "none")),
    _needs_deepspeed("deepspeed_zero3.yaml", "DEEPSPEED", ()),
])
def test_two_processes_match_one(full_one, tiny_model_dir, config, kind, extra):
    """The shipped accelerate config on 2 CPU processes with batch 2 each trains SFT and DPO exactly
    as 1 process with batch 4, records what it ran as, and writes one plain HF final/ from rank 0."""
    from transformers import AutoModelForCausalLM

    tmp = full_one
    out = tmp / Path(config).stem  # one folder per launcher config: the two DeepSpeed ones would share "deepspeed"
    _launch(tmp, _config(tmp, tiny_model_dir, lora=False, batch=2), out, _accelerate(config, *extra))
    for stage, steps in (("sft", 2), ("dpo", 3)):
        _same_trajectory(tmp / "one" / stage, out / stage, steps)
        run = json.loads((out / stage / "run.json").read_text())
        assert run["distributed"]["type"] == kind and run["distributed"]["world_size"] == 2
        assert run["distributed"]["mixed_precision"] == "no" and run["distributed"]["device"] == "cpu"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    a = AutoModelForCausalLM.from_pretrained(tmp / "one" / "dpo" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "dpo" / "final").state_dict()
    assert a.keys() == b.keys() == base.keys()
    # Adam at lr 1e-2 turns last-bit gradient differences into ~1e-4 weight differences; training moved them ~1e-2
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 < max(float((a[k] - base[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def lora_one(tmp_path_factory, tiny_model_dir):
    """One process, batch 4: LoRA DPO for 4 steps (the adapter-disabled policy as reference)."""
    tmp = tmp_path_factory.mktemp("lora")
    _launch(tmp, _config(tmp, tiny_model_dir, lora=True, batch=4), tmp / "one", [sys.executable])
    return tmp


@pytest.mark.e2e
@pytest.mark.parametrize("config,shards", [
    ("fsdp.yaml", "sharded/.metadata"),  # torch distributed-checkpoint shards, one file per rank
    _needs_deepspeed("deepspeed_zero3.yaml", "deepspeed"),  # DeepSpeed's engine checkpoint (a folder per tag)
])
def test_sharded_lora_run_resumes(lora_one, tiny_model_dir, config, shards):
    """LoRA on 2 CPU processes, sharded: 2 steps, a stop, a resume from the sharded step-2 checkpoint
    for 2 more; the 4 losses equal one process's, and final/ is a peft adapter folder with its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = lora_one
    one, two = tmp / "one", tmp / config.split(".")[0]
    cfg = _config(tmp, tiny_model_dir, lora=True, batch=2)
    _launch(tmp, cfg, two, _accelerate(config), stop_at=2)
    assert (two / "dpo" / "checkpoints" / "step-2" / shards).exists() and not (two / "dpo" / "final").exists()
    _launch(tmp, cfg, two, _accelerate(config), resume=True)
    assert json.loads((two / "dpo" / "run.json").read_text())["resumed_from"] == 2
    _same_trajectory(one / "dpo", two / "dpo", 4)
    ids = torch.tensor([[1, 2, 3, 4]])
    got, want = (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "dpo" / "final")
                 for run in (two, one))
    assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-4)
