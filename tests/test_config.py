"""Config loading: typed fields, dotted overrides, every problem at once, did-you-mean, and every
shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from preftune.config import Config, ConfigError, config_from_dict, load_config, to_yaml

CONFIGS = Path(__file__).parents[1] / "configs"


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config) and cfg.dpo.beta == 0.1 and cfg.model.startswith("embedded:")


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  beta: 0.2\n")
    cfg = load_config(p, ["dpo.beta=0.5", "lora.enabled=false", "dpo.max_steps=7", "data.source=x.jsonl"])
    assert cfg.dpo.beta == 0.5 and cfg.lora.enabled is False and cfg.dpo.max_steps == 7
    assert cfg.data.source == "x.jsonl"


def test_every_problem_is_reported_at_once_with_did_you_mean(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  bta: 0.1\n  loss: sigmod\nlora:\n  rr: 4\nsft:\n  batch_size: x\nprecison: bf16\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert len(e.value.problems) == 5
    assert "unknown key 'dpo.bta' (did you mean 'dpo.beta'?)" in msg
    assert "did you mean 'sigmoid'" in msg
    assert "unknown key 'lora.rr' (did you mean 'lora.r'?)" in msg
    assert "sft.batch_size: expected an integer" in msg
    assert "unknown key 'precison' (did you mean 'precision'?)" in msg
    assert str(p) in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dpo": {"loss": "simpo", "reference": "copy", "beta": -1},
                          "data": {"max_length": 64, "max_prompt_length": 64}, "report_to": ["tensorbord"]})
    msg = str(e.value)
    assert "trains without a reference" in msg and "dpo.beta: must be positive" in msg
    assert "max_prompt_length (64) must be below" in msg and "did you mean 'tensorboard'" in msg


def test_curve_every_checks():
    with pytest.raises(ConfigError, match="eval.curve_every: must be 0"):
        config_from_dict({"eval": {"curve_every": -2}})
    with pytest.raises(ConfigError, match="eval.curve_every: curves evaluate win-rate"):
        config_from_dict({"eval": {"curve_every": 4, "winrate": {"enabled": False}, "tasks": []}})
    assert config_from_dict({"eval": {"curve_every": 4, "tasks": []}}).eval.curve_every == 4


def test_eval_datasets_are_data_configs_with_a_name():
    from preftune.config import DataConfig

    cfg = config_from_dict({"eval": {"datasets": [
        {"name": "hh", "source": "hh/", "format": "hh", "max_eval_rows": 64},
        {"name": "shp", "source": "shp.jsonl", "format": "shp", "min_score_ratio": 3, "test_split": None}]}})
    hh, shp = cfg.eval.datasets
    assert isinstance(hh, DataConfig) and (hh.name, hh.source, hh.format, hh.max_eval_rows) == ("hh", "hh/", "hh", 64)
    assert (shp.min_score_ratio, shp.test_split, shp.max_length) == (3.0, None, 512)  # DataConfig's defaults
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_eval_datasets_problems_name_the_entry_and_field():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"eval": {"datasets": [
            {"name": "hh", "source": "a.jsonl", "format": "hhh"},
            {"name": "x", "sourse": "b.jsonl"},
            {"name": "hh", "source": "c.jsonl", "max_length": 64, "max_prompt_length": 64},
            {"name": "a/b", "source": "d.jsonl", "max_eval_rows": 0}]}})
    assert sorted(e.value.problems) == sorted([
        "eval.datasets[0].format: 'hhh' is not a preference format; choose auto or one of hh, shp, chat, standard, "
        "implicit (did you mean 'hh'?)",
        "unknown key 'eval.datasets[1].sourse' (did you mean 'eval.datasets[1].source'?)",
        "eval.datasets[1].source: required (a local file or folder, embedded:NAME, or a Hub dataset)",
        "eval.datasets[2].name: 'hh' is already the name of eval.datasets[0]",
        "eval.datasets[2].max_prompt_length (64) must be below eval.datasets[2].max_length (64)",
        "eval.datasets[3].name: 'a/b' may hold only letters, digits, '.', '_' and '-'",
        "eval.datasets[3].max_eval_rows: must be at least 1 (or null for all), got 0"])
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].name: required"):
        config_from_dict({"eval": {"datasets": [{"source": "a.jsonl"}]}})
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].format: 'alpaca' is not a preference format"):
        config_from_dict({"eval": {"datasets": [{"name": "sft", "source": "a.jsonl", "format": "alpaca"}]}})


def test_shorthands_and_roundtrip():
    cfg = config_from_dict({"lora": False, "data": "file.jsonl"})
    assert cfg.lora.enabled is False and cfg.data.source == "file.jsonl"
    again = config_from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dpo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["dpo.beta"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_preftune_configs_load(path):
    cfg = load_config(path)
    assert cfg.output_dir


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and str(cfg.distributed_type)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"quickstart.yaml", "sweep_beta.yaml"} <= names
    acc = {p.name for p in (CONFIGS / "accelerate").glob("*.yaml")}
    assert {"deepspeed_zero2_offload.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"} <= acc
