"""The training loop: schedule, early stopping, step-0 ln 2 for every reference strategy and for the
chained SFT -> DPO pipeline, exact resume, and 1-process vs 2-process equivalence."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.config.validate import config_from_dict
from preftune.train import EarlyStopping, TrainState, lr_at, run_stage

LN2 = math.log(2)


def write_pairs(folder: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """A folder with train.jsonl / test.jsonl of simple arithmetic preference pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, off in (("train", n_train, 0), ("test", n_test, 100)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(off, off + n):
                a, b = i % 7 + 1, i % 5 + 2
                f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                    "rejected": f"{a} + {b} = {a + b + 1 + i % 3}, I think."}) + "\n")
    return folder


def make_cfg(tmp_path: Path, model: str, **over) -> object:
    raw = {
        "model": model, "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"source": str(write_pairs(tmp_path / "data")), "max_length": 64, "max_prompt_length": 32},
        "sft": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0},
        "dpo": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "eval_batch_size": 4},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
    }
    for k, v in over.items():
        node = raw
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return config_from_dict(raw)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- pure parts


def test_lr_schedule_hand_values():
    """warmup 2 of 10 steps: step 0 -> 1/3, step 1 -> 2/3; cosine from step 2: progress (s-2)/8,
    so step 6 -> 0.5 * (1 + cos(pi/2)) = 0.5; linear at step 6 -> 1 - 4/8 = 0.5; constant -> 1."""
    assert lr_at(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_at(1, 10, 2, "cosine") == pytest.approx(2 / 3)
    assert lr_at(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_at(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_at(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_at(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_at(6, 10, 2, "constant") == 1.0


def test_train_state_reads_what_a_checkpoint_saved():
    """A checkpoint's state.json round-trips; one from before ``dropped_rows`` existed starts it at 0."""
    state = TrainState(step=7, tokens_seen=900, pairs_seen=28, nan_streak=1, skipped_steps=2, dropped_rows=3,
                       epochs_counted=1)
    assert TrainState.from_dict(json.loads(json.dumps(dataclasses.asdict(state)))) == state
    older = TrainState.from_dict({"step": 4, "tokens_seen": 10, "pairs_seen": 8, "nan_streak": 0, "skipped_steps": 0})
    assert older == TrainState(step=4, tokens_seen=10, pairs_seen=8)


def test_early_stopping_stops_at_the_peak():
    """Accuracies 0.50, 0.60, 0.70 (peak), 0.65, 0.68, 0.66 with patience 3 and min_delta 0:
    the best is step 30 and the third round without a new best (step 60) stops the run."""
    es = EarlyStopping("max", patience=3, min_delta=0.0)
    seen = []
    for step, v in zip(range(10, 70, 10), [0.50, 0.60, 0.70, 0.65, 0.68, 0.66]):
        improved, stop = es.update(v, step)
        seen.append((step, improved, stop))
    assert es.best_step == 30 and es.best == 0.70
    assert [s for s, _, stop in seen if stop] == [60]
    assert [s for s, imp, _ in seen if imp] == [10, 20, 30]


def test_early_stopping_auto_delta_ignores_noise():
    """With min_delta='auto' a gain smaller than the reported standard error is not an improvement."""
    es = EarlyStopping("max", patience=2, min_delta="auto")
    assert es.update(0.60, 1, se=0.05) == (True, False)
    assert es.update(0.63, 2, se=0.05) == (False, False)  # +0.03 < se
    assert es.update(0.70, 3, se=0.05) == (True, False)  # +0.10 > se
    assert es.best_step == 3


# ---------------------------------------------------------------- runs on the tiny model


@pytest.mark.parametrize("strategy,lora", [("copy", False), ("adapter", True), ("precomputed", True),
                                           ("precomputed", False)])
def test_step0_loss_is_ln2(tmp_path, tiny_model_dir, monkeypatch, strategy, lora):
    """Policy == reference before the first update: sigmoid DPO loss = ln 2 and every reward = 0."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.reference": strategy, "lora.enabled": lora,
                                                     "dpo.max_steps": 2})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    first = metrics(Path(cfg.output_dir))[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[k] == pytest.approx(0.0, abs=1e-5)
    second = metrics(Path(cfg.output_dir))[1]
    assert second["loss"] != pytest.approx(LN2, abs=1e-5), "the first update must move the policy"


def test_chained_sft_then_dpo_uses_the_sft_model_as_reference(tmp_path, tiny_model_dir, monkeypatch):
    """SFT(LoRA) changes the model; DPO(LoRA) after it starts at ln 2 because its reference is the SFT
    model. Against the bare base the same step-0 policy would have non-zero rewards."""
    from preftune.data.collate import collate_padded
    from preftune.data.sources import load_rows
    from preftune.data.tokenize import RowKind, tokenize
    from preftune.logprobs import SequenceLogps
    from preftune.methods import reference_logps_of
    from preftune.model import load_for_inference
    from preftune.pipeline import run_pipeline

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"sft.max_steps": 4, "dpo.max_steps": 1})
    run_pipeline_stages_only(cfg, run_pipeline)
    out = Path(cfg.output_dir)
    first = metrics(out / "dpo")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # The SFT model really differs from the base on these pairs (so the check above means something).
    base, tok = load_for_inference(str(tiny_model_dir))
    sft, _ = load_for_inference(str(out / "sft" / "merged"))
    rows, _, _ = load_rows(cfg.data, "preference", 0)
    items = tokenize(rows[:4], tok, cfg.data, RowKind.PREFERENCE).items
    batch = collate_padded(items, tok.pad_token_id)
    lb = reference_logps_of(SequenceLogps(base), batch)["chosen"]
    ls = reference_logps_of(SequenceLogps(sft), batch)["chosen"]
    assert (ls - lb).abs().max() > 1e-2
    assert json.loads((out / "dpo" / "run.json").read_text())["base_model"].endswith("merged")


def run_pipeline_stages_only(cfg, run_pipeline):
    """The pipeline's training stages, without evaluation (covered in the pipeline test)."""
    cfg.eval.rewards = False
    cfg.eval.winrate.enabled = False
    cfg.eval.heldout.enabled = False
    cfg.eval.tasks = []
    return run_pipeline(cfg)


def test_resume_continues_the_same_trajectory(tmp_path, tiny_model_dir, monkeypatch):
    """10 steps straight vs 5 steps, a stop, and a resume for 5 more: identical per-step losses."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    over = {"dpo.max_steps": 10, "dpo.save_every": 5, "dpo.batch_size": 2, "dpo.warmup_ratio": 0.2,
            "lora.dropout": 0.1}
    straight = make_cfg(tmp_path / "a", str(tiny_model_dir), **over)
    run_stage(straight, "dpo", Path(straight.output_dir), str(tiny_model_dir))
    resumed = make_cfg(tmp_path / "b", str(tiny_model_dir), **over)
    out = Path(resumed.output_dir)
    first = run_stage(resumed, "dpo", out, str(tiny_model_dir), stop_at=5)
    assert first["stopped_at"] == 5 and not (out / "final").exists()
    second = run_stage(resumed, "dpo", out, str(tiny_model_dir), resume=True)
    assert second["resumed_from"] == 5 and second["steps"] == 10
    a = [m["loss"] for m in metrics(Path(straight.output_dir))]
    b = [m["loss"] for m in metrics(out)]
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


@pytest.mark.e2e
def test_two_processes_match_one(tmp_path, tiny_model_dir):
    """DDP on 2 CPU processes (torchrun, gloo) with batch 2 each == 1 process with batch 4: same
    losses at every step, while the loss moves well away from ln 2 (so a non-distributed run fails)."""
    cfg_path = tmp_path / "cfg.yaml"
    data = write_pairs(tmp_path / "data")
    cfg_path.write_text(json.dumps({
        "model": str(tiny_model_dir), "data": {"source": str(data), "max_length": 64, "max_prompt_length": 32},
        "lora": {"enabled": False}, "sft": {"enabled": False},
        "dpo": {"max_steps": 4, "lr": 1e-2, "warmup_ratio": 0.0, "reference": "copy", "eval_batch_size": 4},
    }))
    env = dict(os.environ, PREFTUNE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "preftune.cli", "dpo", str(cfg_path), f"output_dir={one}",
                    "dpo.batch_size=4"], check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "preftune.cli", "dpo", str(cfg_path), f"output_dir={two}", "dpo.batch_size=2"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 4
    assert a[-1]["loss"] < LN2 - 0.1
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-5)
        assert x["tokens_seen"] == y["tokens_seen"] and x["pairs_seen"] == y["pairs_seen"]


def test_nan_loss_skips_then_aborts(tmp_path, tiny_model_dir, monkeypatch):
    """A NaN loss skips the step with a warning and aborts after nan_tolerance in a row."""
    from preftune.errors import PreftuneError
    from preftune.methods import METHODS, Method

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    real = METHODS["dpo"]

    def nan_step(policy, batch, cfg, ref):
        loss, m = real.step(policy, batch, cfg, ref)
        return loss * float("nan"), m

    monkeypatch.setitem(METHODS, "dpo", Method(step=nan_step, needs_reference=real.needs_reference))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 10, "dpo.nan_tolerance": 3})
    with pytest.raises(PreftuneError, match="(?s)'step0' failed.*step-0 loss is nan"):  # the preflight sees it first
        run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    with pytest.raises(PreftuneError, match="3 consecutive steps"):
        run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir), preflight=False)


def test_early_stopping_in_the_loop_keeps_the_peak_as_best(tmp_path, tiny_model_dir, monkeypatch):
    """The loop fed a constructed eval sequence (accuracies 0.5, 0.6, 0.8, 0.7, 0.7, 0.6 at steps
    1..6, patience 2, min_delta 0) stops at step 5 and keeps step 3 as best/."""
    import preftune.train as train

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    seq = iter([0.5, 0.6, 0.8, 0.7, 0.7, 0.6])
    monkeypatch.setattr(train, "evaluate_batches",
                        lambda *a, **k: {"rewards/accuracies": next(seq), "loss": 0.5, "n": 8})
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 10, "dpo.eval_every": 1,
                                                     "dpo.early_stopping": True, "dpo.patience": 2,
                                                     "dpo.min_delta": 0.0})
    summary = run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    assert summary["stopped_early"] and summary["steps"] == 5
    assert summary["best_step"] == 3 and summary["best_metric"] == 0.8
    best = json.loads((Path(cfg.output_dir) / "best" / "best.json").read_text())
    assert best["best_step"] == 3
    assert (Path(cfg.output_dir) / "best" / "adapter_config.json").is_file()


def test_outputs_load_as_they_are_and_merge_matches(tmp_path, tiny_model_dir, monkeypatch):
    """final/ is a PeftModel adapter folder; `preftune merge` gives a plain model with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.cli import main

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 2})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    final = Path(cfg.output_dir) / "final"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final).eval()
    assert main(["merge", cfg.output_dir, "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 520, 9531, 198, 42, 43]])
    with torch.no_grad():
        a, b, c = peft(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4), "the adapter was trained: it must differ from the base"


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_bf16_runs(tmp_path, tiny_model_dir, monkeypatch, precision):
    """Pure bf16 weights and bf16 autocast both train with finite losses; log-probs stay fp32."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"precision": precision, "dpo.max_steps": 2,
                                                     "dpo.gradient_checkpointing": True})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    rows = metrics(Path(cfg.output_dir))
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-2)


def test_qlora_on_cpu_is_a_clear_error(tmp_path, tiny_model_dir):
    from preftune.errors import PreftuneError
    from preftune.model import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: QLoRA is allowed")
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"lora.quantize_4bit": True})
    with pytest.raises(PreftuneError, match="needs a CUDA GPU"):
        load_model(cfg, str(tiny_model_dir))


def test_flex_attention_training_on_cpu_is_a_clear_error(tmp_path, tiny_model_dir):
    """torch's FlexAttention has no backward on the CPU: a trainable flex model is refused at load, a
    frozen one (reference, evaluation) loads."""
    from preftune.errors import PreftuneError
    from preftune.model import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: flex_attention trains")
    cfg = make_cfg(tmp_path, str(tiny_model_dir), attn_implementation="flex_attention")
    with pytest.raises(PreftuneError, match="'flex_attention' cannot train on the CPU"):
        load_model(cfg, str(tiny_model_dir))
    assert load_model(cfg, str(tiny_model_dir), trainable=False).config._attn_implementation == "flex_attention"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only (no CPU backward)")
def test_flex_attention_trains_on_gpu(tmp_path, tiny_model_dir, monkeypatch):
    """attn_implementation flex_attention: layout auto picks prefix_shared, step 0 is ln 2, the loss moves."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"attn_implementation": "flex_attention", "dpo.max_steps": 3})
    assert run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))["layout"] == "prefix_shared"
    rows = metrics(Path(cfg.output_dir))
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[-1]["loss"] < LN2 - 1e-3


def test_packed_layout_trains_like_prefix_shared(tmp_path, tiny_model_dir, monkeypatch):
    """A token budget that holds all 24 pairs makes one packed micro-batch per step: the same pairs
    as prefix_shared with batch 24, so the trajectories agree (and step 0 is ln 2)."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    runs = {}
    for layout, over in (("packed", {"dpo.token_budget": 100_000}), ("prefix_shared", {"dpo.batch_size": 24})):
        cfg = make_cfg(tmp_path / layout, str(tiny_model_dir), **{"dpo.layout": layout, "dpo.max_steps": 3, **over})
        summary = run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
        assert summary["layout"] == layout
        runs[layout] = metrics(Path(cfg.output_dir))
    assert runs["packed"][0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert runs["packed"][-1]["loss"] < LN2 - 1e-3
    for a, b in zip(runs["packed"], runs["prefix_shared"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["pairs_seen"] == b["pairs_seen"] and a["tokens_seen"] == b["tokens_seen"]


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_train_without_a_reference(tmp_path, tiny_model_dir, monkeypatch, loss):
    """ORPO and SimPO resolve to reference 'none': nothing is precomputed, and the loss moves."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.loss": loss, "dpo.max_steps": 3})
    summary = run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    assert summary["reference"] == "none"
    assert not (tmp_path / "cache" / "reference").exists()
    rows = metrics(Path(cfg.output_dir))
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]


def test_a_stage_restores_the_thread_count(tmp_path, tiny_model_dir, monkeypatch):
    """``threads`` applies to the stage only: the process's torch thread count is restored after it."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 1, "threads": before + 1})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- transformers' schedules, AdamW variants

HF_CASES = [
    ("constant_with_warmup", {}), ("inverse_sqrt", {}), ("inverse_sqrt", {"timescale": 3}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_with_min_lr", {"min_lr": 0.01}),
    ("polynomial", {"lr_end": 1e-3, "power": 2.0}),
    ("warmup_stable_decay", {"num_decay_steps": 6, "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", {"num_decay_steps": 4, "decay_type": "1-sqrt"}),
]


@pytest.mark.parametrize("schedule, kwargs", HF_CASES)
def test_each_new_schedule_matches_transformers_step_by_step(schedule, kwargs):
    """The learning rate a transformers scheduler gives optimizer step k (a real optimizer stepped
    through ``get_scheduler``) is base lr x ``lr_at(k, ...)``, for every step."""
    import transformers

    total, warmup, base = 20, 3, 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = transformers.get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total,
                                           scheduler_specific_kwargs=dict(kwargs))
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours = [base * lr_at(k, total, warmup, schedule, kwargs, base) for k in range(total)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert len(set(ours)) > 2  # the schedule moves (warm-up and decay are exercised)


def test_a_run_follows_inverse_sqrt(tmp_path, tiny_model_dir, monkeypatch):
    """The loop sets each step's learning rate from the schedule: metrics.jsonl's lr column is
    transformers' inverse_sqrt (with 2 warm-up steps, ``dpo.warmup_steps``), step by step."""
    import transformers

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.schedule": "inverse_sqrt", "dpo.warmup_steps": 2,
                                                     "dpo.max_steps": 4, "dpo.schedule_kwargs": {"timescale": 1}})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.dpo.lr)
    ref = transformers.get_scheduler("inverse_sqrt", opt, num_warmup_steps=2, scheduler_specific_kwargs={"timescale": 1})
    expected = []
    for _ in range(4):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [m["lr"] for m in metrics(Path(cfg.output_dir))] == pytest.approx(expected)


def test_bitsandbytes_optimizers_are_refused_on_a_cpu(tmp_path, tiny_model_dir):
    from preftune.errors import PreftuneError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bitsandbytes optimizers are allowed")
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.optimizer": "paged_adamw_32bit"})
    with pytest.raises(PreftuneError, match="optimizer 'paged_adamw_32bit' is bitsandbytes' PagedAdamW32bit.*CUDA GPU "
                                            "only.*Use optimizer adamw"):
        run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_adamw_fused_is_torchs_fused_adamw_with_the_same_steps():
    """``adamw_fused`` builds torch's fused AdamW where torch has one for the device; it steps like AdamW."""
    from preftune.config.schema import DPOConfig
    from preftune.train import build_optimizer

    torch.manual_seed(0)
    start = torch.randn(8)
    results = {}
    for name in ("adamw", "adamw_fused"):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer([p], DPOConfig(optimizer=name, lr=0.1, weight_decay=0.01))
        assert opt.defaults.get("fused") is (True if name == "adamw_fused" else None)
        for _ in range(3):
            p.grad = torch.ones(8) * p.detach()
            opt.step()
        results[name] = p.detach().clone()
    assert torch.allclose(results["adamw"], results["adamw_fused"], atol=1e-6)
