"""Every loss through ``preftune dpo`` on the tiny model: the run finishes and writes its metrics, and at
step 0, with policy == reference, each reference-based loss has its known value for the precomputed
and the adapter reference (KTO included, on pairs split by ``dpo.unpair``). TR-DPO's reference sync."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.losses import LOSSES
from test_train import write_pairs

LN2 = math.log(2)

STEP0 = {
    # loss -> its value at policy == reference (every log-ratio 0) with default parameters, beta 0.1
    "sigmoid": LN2,  # -log sigma(0)
    "hinge": 1.0,  # relu(1 - 0)
    "ipo": 25.0,  # (0 - 1 / (2 * 0.1))^2
    "exo_pair": 0.5 * (math.log(0.5) - math.log1p(-1e-3)) + 0.5 * (math.log(0.5) - math.log(1e-3)),
    "nca_pair": 2 * LN2,  # -log sigma(0) - 1/2 log sigma(0) - 1/2 log sigma(0)
    "robust": LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 50.0,  # (0 - 5)^2 + (0 + 5)^2
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,  # (1 - 1/2) + 1/2
    "apo_down": 1.0,  # 1/2 + (1 - 1/2)
    "discopop": 0.5 * LN2 + 0.5,  # mixing sigma(0) = 1/2 of ln 2 and e^0
    "sigmoid_norm": LN2,
    "kto": 0.5,  # 1 - sigma(beta (0 - z_0)), z_0 = max(0, 0) = 0, for either label
    "apo_zero_unpaired": 0.5,  # 1 - sigma(0) or sigma(0)
}
REFERENCE_FREE = sorted(n for n, s in LOSSES.items() if not s.needs_reference)
CASES = [(n, r) for n in STEP0 for r in ("precomputed", "adapter")] + [(n, "none") for n in REFERENCE_FREE]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """One data folder and one reference cache for all runs: the precomputed table is computed once
    for the pairs and once for the unpaired rows, then reused by every other loss."""
    root = tmp_path_factory.mktemp("losses")
    return {"data": write_pairs(root / "data", n_train=8, n_test=4), "cache": root / "cache", "model": str(tiny_model_dir)}


def config(tmp_path: Path, shared: dict, **dpo) -> Path:
    cfg = {
        "model": shared["model"], "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"source": str(shared["data"]), "max_length": 48, "max_prompt_length": 24},
        "dpo": {"max_steps": 2, "batch_size": 4, "eval_batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0,
                "schedule": "constant", **dpo},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dpo(path: Path, *overrides: str) -> list[dict]:
    assert main(["dpo", str(path), *overrides]) == 0
    out = Path(yaml.safe_load(path.read_text())["output_dir"])
    assert (out / "final").is_dir() and (out / "run.json").is_file()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.parametrize("loss,reference", CASES)
def test_every_loss_runs_through_preftune_dpo(tmp_path, shared, monkeypatch, loss, reference):
    """``preftune dpo`` with each loss: 2 steps, metrics.jsonl with a finite loss and the held-out
    eval. Reference-based losses: step 0's loss is the known value at policy == reference and every
    reward is 0, for the precomputed cache and the adapter reference alike."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(shared["cache"]))
    extra = {"unpair": True} if LOSSES[loss].unpaired else {}
    rows = run_dpo(config(tmp_path, shared, loss=loss, reference="auto" if reference == "none" else reference,
                          **extra))
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert "eval/loss" in rows[-1] and "rewards/margins" in rows[0]
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["method"] == loss and summary["reference"] == reference
    if reference != "none":
        assert rows[0]["loss"] == pytest.approx(STEP0[loss], abs=1e-5)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert rows[0][key] == pytest.approx(0.0, abs=1e-5), key
        assert rows[1]["rewards/margins"] != pytest.approx(0.0, abs=1e-7), "the first update must move the policy"


@pytest.mark.e2e
@pytest.mark.parametrize("reference,lora", [("copy", False), ("copy", True), ("adapter", True)])
def test_tr_dpo_hard_sync_every_step_keeps_reference_equal_to_policy(tmp_path, shared, monkeypatch, reference, lora):
    """TR-DPO with ref_model_mixup_alpha 1 and a sync after every step: each step starts with
    reference == policy, so every step's loss is ln 2 and its margins 0, while the policy moves (without
    the sync the second step's margin is not 0, as test_every_loss_runs_through_preftune_dpo shows).
    copy: the frozen model takes the policy's (LoRA-merged) weights; adapter: a frozen second adapter."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(shared["cache"]))
    path = config(tmp_path, shared, reference=reference, sync_ref_model=True, ref_model_sync_steps=1,
                  ref_model_mixup_alpha=1.0, max_steps=3)
    rows = run_dpo(path, f"lora.enabled={str(lora).lower()}")
    for row in rows:
        assert row["loss"] == pytest.approx(LN2, abs=1e-5)
        assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["grad_norm"] > 0


def test_tr_dpo_soft_update_mixes_weights():
    """ref <- alpha * policy + (1 - alpha) * ref on every weight (copy strategy), alpha 0.6; a LoRA
    policy's delta B A is merged into the weight it is mixed from."""
    import torch
    from peft import LoraConfig, get_peft_model

    from preftune.embedded import tiny_llama
    from preftune.logprobs import SequenceLogps
    from preftune.reference import ModelReference, sync_reference

    policy, _ = tiny_llama(seed=0)
    frozen, _ = tiny_llama(seed=1)
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    sync_reference(ModelReference(SequenceLogps(frozen), "copy"), policy, 0.6)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(dict(frozen.named_parameters())[name], 0.6 * p + 0.4 * before[name])
    peft = get_peft_model(tiny_llama(seed=2)[0], LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    sync_reference(ModelReference(SequenceLogps(frozen), "copy"), peft, 1.0)
    torch.testing.assert_close(frozen.model.layers[0].self_attn.q_proj.weight, expected)


@pytest.mark.e2e
@pytest.mark.parametrize("dpo,lora,step0", [
    ({"loss": "sigmoid", "ld_alpha": 0.5, "reference": "precomputed"}, True, LN2),  # LD sums from the cache
    ({"loss": "kto", "unpair": True, "layout": "packed", "token_budget": 256, "reference": "copy"}, False, 0.5),
    ({"loss": [{"name": "sigmoid"}, {"name": "sft", "weight": 0.5}], "wpo": True, "reference": "adapter"}, True, None),
], ids=["ld_alpha-precomputed", "kto-packed-copy", "rpo-wpo-adapter"])
def test_loss_options_through_the_loop(tmp_path, shared, monkeypatch, dpo, lora, step0):
    """LD-DPO with the precomputed cache (its tail sums), KTO in the packed layout with a frozen copy,
    and a weighted list with WPO weights: each run finishes with finite losses and, where known, the
    step-0 value (LD-DPO weights policy and reference alike, so still ln 2)."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(shared["cache"]))
    rows = run_dpo(config(tmp_path, shared, **dpo), f"lora.enabled={str(lora).lower()}")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if step0 is not None:
        assert rows[0]["loss"] == pytest.approx(step0, abs=1e-5)
    else:
        assert "nll_loss" in rows[0] and "loss/sigmoid" in rows[0]
