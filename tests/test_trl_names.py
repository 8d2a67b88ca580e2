"""TRL and axolotl names: the unknown-key error names preftune's key, and ``config from-trl`` turns a
real TRL DPOConfig/SFTConfig file into a config that ``config show`` accepts (more recipes: test_recipes.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from preftune.cli import main
from preftune.config import ConfigError
from preftune.config.validate import config_from_dict, load_config
from preftune.recipes import convert_trl
from preftune.trl_names import NAMES, hint

# A DPO recipe as TRL's scripts take it: DPOConfig (TrainingArguments) + ModelConfig + ScriptArguments keys.
TRL_DPO = {
    "model_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
    "dataset_name": "trl-lib/ultrafeedback_binarized",
    "learning_rate": 5.0e-7,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 8,
    "gradient_checkpointing": True,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "logging_steps": 25,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_steps": 100,
    "max_length": 1024,
    "beta": 0.05,
    "loss_type": ["sigmoid", "sft"],
    "loss_weights": [1.0, 0.2],
    "bf16": True,
    "seed": 7,
    "output_dir": "Qwen2-0.5B-DPO",
    "report_to": "tensorboard",
    "use_peft": True,
    "lora_r": 32,
    "lora_alpha": 16,
    "optim": "adamw_torch",
}


def test_the_recipe_is_real_trl():
    """Every key of the recipe is a field of TRL 1.16's DPOConfig, ModelConfig or ScriptArguments, and
    TRL accepts the values (so the conversion below is tested on what TRL users actually write)."""
    trl = pytest.importorskip("trl")
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments)}
    assert set(TRL_DPO) <= set().union(*fields.values())
    trl.DPOConfig(**{k: v for k, v in TRL_DPO.items() if k in fields[trl.DPOConfig]}, use_cpu=True)
    trl.ModelConfig(**{k: v for k, v in TRL_DPO.items() if k in fields[trl.ModelConfig]})


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_from_trl_converts_a_dpo_config_that_config_show_accepts(tmp_path, capsys, fmt):
    src = tmp_path / f"dpo.{fmt}"
    src.write_text(yaml.safe_dump(TRL_DPO) if fmt == "yaml" else json.dumps(TRL_DPO))
    out = tmp_path / "preftune.yaml"
    assert main(["config", "from-trl", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # every key maps (loss_weights settles DPO); only TRL's unset target modules mean something else
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith(("not mapped", "NOTE"))] == [
        "not mapped"] and "not mapped: lora_target_modules: unset in TRL adapts peft's default" in err
    cfg = load_config(out)
    assert (cfg.model, cfg.data.source, cfg.data.max_length) == ("Qwen/Qwen2-0.5B-Instruct",
                                                                "trl-lib/ultrafeedback_binarized", 1024)
    d = cfg.dpo
    assert (d.lr, d.epochs, d.batch_size, d.eval_batch_size, d.grad_accum) == (5e-7, 2.0, 2, 4, 8)
    assert (d.gradient_checkpointing, d.schedule, d.warmup_ratio, d.log_every, d.eval_every, d.save_every) == (
        True, "cosine", 0.1, 25, 50, 100)
    assert d.optimizer == "adamw"
    assert (d.beta, d.loss) == (0.05, [{"name": "sigmoid"}, {"name": "sft", "weight": 0.2}])  # TRL's [sigmoid, sft]: RPO
    assert (cfg.precision, cfg.seed, cfg.output_dir, cfg.report_to) == ("bf16-mixed", 7, "Qwen2-0.5B-DPO",
                                                                        ["tensorboard"])
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha) == (True, 32, 16)
    assert not cfg.sft.enabled and cfg.dpo.enabled
    assert main(["config", "show", str(out)]) == 0
    assert "beta: 0.05" in capsys.readouterr().out


def test_sft_config_goes_to_the_sft_stage_and_full_finetune_by_default():
    conv = convert_trl({"learning_rate": 2e-5, "packing": True, "dataset_name": "trl-lib/Capybara",
                        "max_length": 2048, "completion_only_loss": False, "loss_type": "nll",
                        "lr_scheduler_type": "inverse_sqrt", "fp16": True})
    cfg, unmapped = config_from_dict(conv.tree), conv.unmapped
    assert cfg.dpo.enabled is False and cfg.sft.enabled is True
    assert (cfg.sft.lr, cfg.sft.completion_only) == (2e-5, False)
    assert (cfg.sft.data.source, cfg.sft.data.max_length) == ("trl-lib/Capybara", 2048)
    assert cfg.lora.enabled is False  # TRL trains all weights without use_peft
    assert cfg.sft.schedule == "inverse_sqrt" and cfg.sft.optimizer == "adamw_fused"  # TRL's default optim
    assert (cfg.seed, cfg.sft.epochs, cfg.sft.batch_size) == (42, 3.0, 8)  # TrainingArguments' defaults
    assert sorted(u.split(":")[0] for u in unmapped) == ["fp16", "packing"]


@pytest.mark.parametrize("override, message", [
    ("dpo.per_device_train_batch_size=2", "TRL's `per_device_train_batch_size` is `dpo.batch_size` here"),
    ("dpo.eval_steps=5", "TRL's `eval_steps` is `dpo.eval_every` here"),
    ("dpo.rpo_alpha=1", "TRL's `rpo_alpha` is `dpo.sft_weight` here"),
    ("learning_rate=1e-5", "TRL's `learning_rate` is `dpo.lr` (or `sft.lr`) here"),
    ("sft.learning_rate=1e-5", "TRL's `learning_rate` is `sft.lr` here"),
    ("bf16=true", "TRL's `bf16` is `precision` here; bf16: true is precision: bf16-mixed"),
    ("dpo.max_length=512", "TRL's `max_length` is `data.max_length` here"),
    ("dpo.gradient_accumulation_steps=4", "TRL's `gradient_accumulation_steps` is `dpo.grad_accum` here"),
    ("num_train_epochs=3", "TRL's `num_train_epochs` is `dpo.epochs` (or `sft.epochs`) here"),
    ("model_name_or_path=x", "TRL's `model_name_or_path` is `model` here"),
    ("dpo.micro_batch_size=2", "axolotl's `micro_batch_size` is `dpo.batch_size` here"),
])
def test_a_trl_key_used_directly_names_the_right_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "did you mean" not in str(e.value)  # no misleading spelling guess beside it


def test_plain_typos_still_get_did_you_mean():
    with pytest.raises(ConfigError, match=r"did you mean 'dpo.beta'"):
        load_config(None, ["dpo.betta=0.1"])


def test_every_mapped_key_exists_in_preftune():
    """Each table entry points at a real config key (a renamed field would break the table silently)."""
    from preftune.config.schema import Config

    def exists(dotted: str) -> bool:
        node = Config()
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                return False
            node = getattr(node, part)
        return True

    for name, entry in NAMES.items():
        if entry.key:
            for stage in ("sft", "dpo"):
                assert exists(entry.key.replace("{stage}", stage)), name
        assert hint(name) is not None
