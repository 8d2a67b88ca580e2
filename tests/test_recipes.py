"""Recipes users bring: alignment-handbook-style TRL recipes, axolotl and LLaMA-Factory configs convert
into preftune configs that ``config show`` accepts, with the other tool's defaults for what they leave
out, every unmapped key listed, and an uncertain trainer said on stderr and in the file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from preftune.cli import main
from preftune.config.validate import load_config
from preftune.data.sources import load_rows
from preftune.errors import PreftuneError
from preftune.recipes import TRL_KIND, convert_trl, trl_defaults

# Written to the shape of the alignment-handbook's zephyr recipes (recipes/zephyr-7b-beta/dpo/config_full.yaml,
# config_qlora.yaml and the ORPO recipe): the keys, values and layout users run, not copies of the files.
HANDBOOK_DPO_FULL = {  # no max_length: TRL 1.16's 1024 is meant
    "model_name_or_path": "alignment-handbook/zephyr-7b-sft-full", "torch_dtype": None,
    "dataset_mixer": {"HuggingFaceH4/ultrafeedback_binarized": 1.0}, "dataset_splits": ["train_prefs", "test_prefs"],
    "preprocessing_num_workers": 12, "bf16": True, "beta": 0.01, "do_eval": True, "evaluation_strategy": "steps",
    "eval_steps": 100, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False}, "hub_model_id": "zephyr-7b-dpo-full",
    "learning_rate": 5.0e-7, "log_level": "info", "logging_steps": 10, "lr_scheduler_type": "cosine",
    "max_prompt_length": 512, "num_train_epochs": 1, "optim": "adamw_torch", "output_dir": "data/zephyr-7b-dpo-full",
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "push_to_hub": True, "save_strategy": "steps",
    "save_steps": 100, "save_total_limit": 1, "seed": 42, "warmup_ratio": 0.1,
}
HANDBOOK_DPO_QLORA = {
    "model_name_or_path": "alignment-handbook/zephyr-7b-sft-qlora", "torch_dtype": "bfloat16",
    "use_flash_attention_2": True, "load_in_4bit": True, "use_peft": True, "lora_r": 128, "lora_alpha": 128,
    "lora_dropout": 0.05, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"],
    "dataset_mixer": {"HuggingFaceH4/ultrafeedback_binarized": 1.0, "HuggingFaceH4/orca_dpo_pairs": 0.25},
    "dataset_splits": ["train_prefs", "test_prefs"], "preprocessing_num_workers": 12, "bf16": True, "beta": 0.01,
    "do_eval": True, "evaluation_strategy": "steps", "eval_steps": 100, "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "hub_model_id": "zephyr-7b-dpo-qlora", "learning_rate": 5.0e-6, "log_level": "info", "logging_steps": 10,
    "lr_scheduler_type": "cosine", "max_length": 1024, "max_prompt_length": 512, "num_train_epochs": 1,
    "optim": "paged_adamw_32bit", "output_dir": "data/zephyr-7b-dpo-qlora", "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8, "push_to_hub": True, "save_strategy": "steps", "save_steps": 100,
    "save_total_limit": 1, "seed": 42, "warmup_ratio": 0.1,
}
ZEPHYR_TEMPLATE = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
                   "+ eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] "
                   "+ eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
                   "{% endif %}\n{% endfor %}")
HANDBOOK_ORPO = {
    "model_name_or_path": "mistral-community/Mixtral-8x22B-v0.1", "model_revision": "8f3a7f2c", "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2", "chat_template": ZEPHYR_TEMPLATE,
    "dataset_mixer": {"argilla/distilabel-capybara-dpo-7k-binarized": 1.0}, "dataset_splits": ["train"],
    "preprocessing_num_workers": 8, "bf16": True, "beta": 0.05, "do_eval": False, "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True},
    "hub_model_id": "zephyr-orpo-141b-A35b-v0.1", "learning_rate": 5.0e-6, "log_level": "info", "logging_steps": 10,
    "lr_scheduler_type": "inverse_sqrt", "max_length": 2048, "max_prompt_length": 1792, "max_completion_length": 1024,
    "num_train_epochs": 3, "optim": "adamw_bnb_8bit", "output_dir": "data/zephyr-orpo-141b-A35b-v0.1",
    "per_device_train_batch_size": 1, "push_to_hub": True, "report_to": ["tensorboard", "wandb"],
    "save_strategy": "no", "seed": 42, "warmup_steps": 100,
}


def convert_file(tmp_path, capsys, command: str, recipe: dict, *args: str):
    """Run ``preftune config COMMAND recipe.yaml --out out.yaml``: (the loaded config, the file's text, stderr)."""
    src, out = tmp_path / "recipe.yaml", tmp_path / "preftune.yaml"
    src.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["config", command, str(src), "--out", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert main(["config", "show", str(out)]) == 0  # as written, no edits
    capsys.readouterr()
    return load_config(out), out.read_text(), err


# ---------------------------------------------------------------- TRL / alignment-handbook


def test_trl_defaults_are_trl_1_16s():
    """Each default the converter fills is the default of TRL's own config class (bf16: None is true)."""
    trl = pytest.importorskip("trl")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    classes = {"dpo": trl.DPOConfig, "orpo": ORPOConfig, "cpo": CPOConfig, "simpo": CPOConfig, "kto": trl.KTOConfig,
               "sft": trl.SFTConfig}
    set_by_simpo = {"loss_type", "cpo_alpha"}  # SimPO is CPOConfig with loss_type simpo and no NLL term
    for kind, cls in classes.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in trl_defaults(kind).items():
            if kind == "simpo" and key in set_by_simpo:
                continue
            f = fields[key]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert (True if key == "bf16" and default is None else default) == value, (kind, key)
    assert set(TRL_KIND) == set(classes)


def test_handbook_dpo_full_without_max_length_converts_with_trls_1024(tmp_path, capsys):
    cfg, text, err = convert_file(tmp_path, capsys, "from-trl", HANDBOOK_DPO_FULL)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)  # was: "512 is not below 512"
    assert (cfg.data.source, cfg.data.split, cfg.data.test_split, cfg.data.num_proc) == (
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs", 12)
    d = cfg.dpo
    assert (d.loss, d.beta, d.lr, d.schedule, d.warmup_ratio, d.optimizer) == ("sigmoid", 0.01, 5e-7, "cosine", 0.1, "adamw")
    assert (d.eval_every, d.save_every, d.save_total_limit, d.gradient_checkpointing) == (100, 100, 1, True)
    assert (cfg.precision, cfg.push_to, cfg.lora.enabled, cfg.sft.enabled) == ("bf16-mixed", "zephyr-7b-dpo-full",
                                                                              False, False)
    assert "not mapped: evaluation_strategy" not in err and "not mapped: optim" not in err
    assert "not mapped: gradient_checkpointing_kwargs" not in err and "not mapped: push_to_hub" not in err
    # no trainer-only key: DPO is assumed from the recipe's name, and said in both places
    assert "assumed DPO from hub_model_id" in err and "# NOTE: no key settles the trainer; assumed DPO" in text


def test_handbook_dpo_qlora_mixer_is_a_weighted_source_list_with_its_test_split(tmp_path, capsys):
    cfg, _, err = convert_file(tmp_path, capsys, "from-trl", HANDBOOK_DPO_QLORA)
    assert [(m.source, m.fraction) for m in cfg.data.mixture] == [("HuggingFaceH4/ultrafeedback_binarized", 1.0),
                                                                   ("HuggingFaceH4/orca_dpo_pairs", 0.25)]
    assert (cfg.data.split, cfg.data.test_split) == ("train_prefs", "test_prefs")
    assert (cfg.lora.enabled, cfg.lora.quantize_4bit, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (
        True, True, 128, 128, 0.05)
    assert (cfg.precision, cfg.attn_implementation, cfg.dpo.optimizer) == ("bf16", "flash_attention_2", "paged_adamw_32bit")
    assert "dataset_mixer" not in err and "use_flash_attention_2" not in err


def test_handbook_orpo_trains_orpo_with_its_lambda_template_and_revision(tmp_path, capsys):
    cfg, text, err = convert_file(tmp_path, capsys, "from-trl", HANDBOOK_ORPO, "--kind", "orpo")
    assert cfg.dpo.loss == {"name": "orpo", "lambda": 0.05}  # TRL's ORPO beta is ORPO's lambda
    from preftune.loss_terms import terms

    assert [(t.name, t.params.lambda_) for t in terms(cfg.dpo)] == [("orpo", 0.05)]
    assert cfg.data.chat_template == ZEPHYR_TEMPLATE and cfg.model_revision == "8f3a7f2c"
    assert (cfg.dpo.schedule, cfg.dpo.optimizer, cfg.dpo.epochs) == ("inverse_sqrt", "adamw_8bit", 3.0)
    assert (cfg.data.source, cfg.data.split, cfg.data.test_split) == ("argilla/distilabel-capybara-dpo-7k-binarized",
                                                                      "train", None)
    assert cfg.dpo.warmup_steps == 100
    for key in ("gradient_checkpointing_kwargs", "max_completion_length"):
        assert f"not mapped: {key}:" in err and f"# not mapped: {key}:" in text
    assert "NOTE" not in err  # --kind given: nothing assumed


def test_an_orpo_recipe_never_silently_trains_dpo():
    """Without --kind, the ORPO recipe is read as ORPO from its name, and the reader is told."""
    conv = convert_trl(dict(HANDBOOK_ORPO))
    assert conv.kind == "orpo" and conv.tree["dpo"]["loss"]["name"] == "orpo"
    assert any("assumed ORPO from hub_model_id" in n for n in conv.notes)


@pytest.mark.parametrize("recipe, kind, loss", [
    ({"beta": 0.1, "rpo_alpha": 1.0}, "dpo", [{"name": "sigmoid"}, {"name": "sft", "weight": 1.0}]),
    ({"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 1.0, "cpo_alpha": 0.0}, "simpo", {"name": "simpo", "gamma": 1.0}),
    ({"beta": 0.1, "cpo_alpha": 0.5}, "cpo", {"name": "cpo", "alpha": 0.5}),
    ({"beta": 2.5, "gamma_beta_ratio": 0.4, "sft_weight": 0.0}, "simpo", {"name": "simpo", "gamma": 1.0}),
    ({"desirable_weight": 1.33}, "kto", {"name": "kto", "desirable_weight": 1.33, "undesirable_weight": 1.0}),
])
def test_trainer_keys_settle_the_kind_and_the_loss(recipe, kind, loss):
    conv = convert_trl(recipe)
    assert (conv.kind, conv.tree["dpo"]["loss"], conv.notes) == (kind, loss, [])


def test_an_undeterminable_trainer_is_said_on_stderr_and_in_the_header(tmp_path, capsys):
    _, text, err = convert_file(tmp_path, capsys, "from-trl", {"beta": 0.2, "learning_rate": 1e-6, "output_dir": "out"})
    assert "NOTE: no key settles the trainer" in err and "assumed DPO" in err
    assert text.splitlines()[1].startswith("# NOTE: no key settles the trainer")


def test_keys_of_two_trainers_and_reward_recipes_are_refused():
    with pytest.raises(PreftuneError, match="several TRL trainers.*--kind"):
        convert_trl({"rpo_alpha": 1.0, "desirable_weight": 1.0})
    with pytest.raises(PreftuneError, match="reward model.*rounds.reward_model"):
        convert_trl({"center_rewards_coefficient": 0.01})


def test_a_mixer_reads_each_source_fraction_and_test_split(tmp_path):
    """``data.mixture`` on real files: the first fraction of each source's training rows (the handbook's
    rule) and every source's held-out split, counted in the report."""
    from preftune.config.validate import config_from_dict

    for name, n in (("a", 10), ("b", 8)):
        folder = tmp_path / name
        folder.mkdir()
        for split, rows in (("train", n), ("test", 2)):
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"prompt": f"{name}{split}{i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(rows)))
    cfg = config_from_dict({"data": {"mixture": [{"source": str(tmp_path / "a"), "fraction": 1.0},
                                                 {"source": str(tmp_path / "b"), "fraction": 0.5}]}})
    train, test, report = load_rows(cfg.data, "preference", 0)
    assert [r.prompt for r in train] == [f"atrain{i}?" for i in range(10)] + [f"btrain{i}?" for i in range(4)]
    assert sorted(r.prompt for r in test) == ["atest0?", "atest1?", "btest0?", "btest1?"]
    assert report.dropped == {"mixture_fraction": 4}


def test_mixture_and_recipe_settings_are_checked_at_load():
    from preftune.config import ConfigError
    from preftune.config.validate import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": "tiny:0", "model_revision": "v1",
                          "data": {"mixture": [{"source": "a", "fraction": 1.5}, {"fraction": 0.5, "format": "sharegtp"}]},
                          "sft": {"data": {"chat_template": "{{ x }}"}},
                          "dpo": {"schedule": "cosine_with_min_lr"}})
    problems = "\n".join(e.value.problems)
    for expected in ("data.mixture[0].fraction: must be in (0, 1], got 1.5", "data.mixture[1].source: required",
                     "data.mixture[1].format: unknown format 'sharegtp' (did you mean 'sharegpt'?)",
                     "model_revision: 'v1' pins a Hub model's revision, but model 'tiny:0' is local",
                     "sft.data.chat_template: one template serves every stage",
                     "dpo.schedule_kwargs: schedule 'cosine_with_min_lr' needs min_lr or min_lr_rate"):
        assert expected in problems


# ---------------------------------------------------------------- axolotl


AXOLOTL_DPO = {  # the shape of axolotl's examples/*/dpo and qlora configs
    "base_model": "meta-llama/Meta-Llama-3-8B-Instruct", "load_in_8bit": False, "load_in_4bit": True, "strict": False,
    "chat_template": "llama3", "rl": "dpo", "rl_beta": 0.05,
    "datasets": [{"path": "fozziethebeat/alpaca_messages_2k_dpo_test", "type": "chat_template.default",
                  "field_messages": "conversation", "field_chosen": "chosen", "field_rejected": "rejected",
                  "message_property_mappings": {"role": "role", "content": "content"}},
                 {"path": "Intel/orca_dpo_pairs", "split": "train", "type": "chatml.intel"}],
    "dataset_prepared_path": None, "val_set_size": 0.05, "output_dir": "./outputs/dpo-out", "adapter": "qlora",
    "lora_r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_linear": True, "sequence_len": 4096,
    "sample_packing": False, "gradient_accumulation_steps": 4, "micro_batch_size": 2, "num_epochs": 4,
    "optimizer": "paged_adamw_32bit", "lr_scheduler": "cosine", "learning_rate": 0.0002, "bf16": "auto", "tf32": False,
    "gradient_checkpointing": True, "flash_attention": True, "warmup_ratio": 0.1, "evals_per_epoch": 4,
    "saves_per_epoch": 1, "weight_decay": 0.0, "special_tokens": {"pad_token": "<|end_of_text|>"},
}


def test_axolotl_dpo_qlora(tmp_path, capsys):
    cfg, _, err = convert_file(tmp_path, capsys, "from-axolotl", AXOLOTL_DPO)
    assert (cfg.model, cfg.dpo.loss, cfg.dpo.beta, cfg.sft.enabled) == ("meta-llama/Meta-Llama-3-8B-Instruct", "sigmoid",
                                                                        0.05, False)
    assert (cfg.lora.enabled, cfg.lora.quantize_4bit, cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (
        True, True, 32, 16, ["all-linear"])
    d = cfg.dpo
    assert (d.batch_size, d.grad_accum, d.epochs, d.lr, d.schedule, d.optimizer) == (2, 4, 4.0, 2e-4, "cosine",
                                                                                     "paged_adamw_32bit")
    assert (cfg.data.max_length, cfg.data.test_size, cfg.data.test_split) == (4096, 0.05, None)
    assert (cfg.precision, cfg.attn_implementation) == ("bf16-mixed", "flash_attention_2")
    first, second = cfg.data.mixture
    assert (first.source, first.columns, second.source, second.format, second.columns) == (
        "fozziethebeat/alpaca_messages_2k_dpo_test", {"prompt": "conversation", "chosen": "chosen", "rejected": "rejected"},
        "Intel/orca_dpo_pairs", "standard", {"prompt": "question"})
    for key in ("sample_packing", "special_tokens", "chat_template", "datasets[1].type", "evals_per_epoch"):
        assert f"not mapped: {key}:" in err


@pytest.mark.parametrize("rl, extra, loss", [
    ("orpo", {"orpo_alpha": 0.1}, {"name": "orpo", "lambda": 0.1}),
    ("ipo", {}, "ipo"),
    ("simpo", {"simpo_gamma": 0.5, "cpo_alpha": 0.0}, {"name": "simpo", "gamma": 0.5}),
])
def test_axolotl_rl_picks_the_loss(rl, extra, loss):
    from preftune.config.validate import config_from_dict
    from preftune.recipes import convert_axolotl

    conv = convert_axolotl({"base_model": "m", "rl": rl, **extra,
                            "datasets": [{"path": "argilla/ultrafeedback-binarized-preferences", "type": "chatml.argilla"}]})
    assert conv.tree["dpo"]["loss"] == loss
    cfg = config_from_dict(conv.tree)
    assert cfg.data.columns == {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"}


def test_axolotl_kto_and_sft(tmp_path):
    from preftune.config.validate import config_from_dict
    from preftune.recipes import convert_axolotl

    kto = config_from_dict(convert_axolotl({"base_model": "m", "rl": "kto", "kto_undesirable_weight": 1.5, "rl_beta": 0.2,
                                            "datasets": [{"path": "argilla/kto-mix-15k", "type": "llama3.ultra"}]}).tree)
    assert (kto.dpo.loss, kto.dpo.beta, kto.data.format) == (
        {"name": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.5}, 0.2, "kto")
    sft = config_from_dict(convert_axolotl({"base_model": "m", "train_on_inputs": False, "sequence_len": 2048,
                                            "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}]}).tree)
    assert (sft.sft.enabled, sft.dpo.enabled, sft.sft.completion_only) == (True, False, True)
    assert (sft.sft.data.source, sft.sft.data.format, sft.sft.data.max_length) == ("mhenrichsen/alpaca_2k_test", "alpaca", 2048)


# ---------------------------------------------------------------- LLaMA-Factory


LF_DPO = {  # the shape of LLaMA-Factory's examples/train_lora/llama3_lora_dpo.yaml
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "trust_remote_code": True, "stage": "dpo",
    "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "pref_beta": 0.1,
    "pref_loss": "sigmoid", "dataset": "dpo_en_demo,hh_local", "template": "llama3", "cutoff_len": 2048,
    "max_samples": 1000, "overwrite_cache": True, "preprocessing_num_workers": 16, "output_dir": "saves/llama3-8b/lora/dpo",
    "logging_steps": 10, "save_steps": 500, "plot_loss": True, "overwrite_output_dir": True,
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 5.0e-6, "num_train_epochs": 3.0,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "ddp_timeout": 180000000,
}
LF_INFO = {  # dataset_info.json: a ShareGPT ranking file and an Alpaca ranking file with other column names
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": True,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "hh_local": {"file_name": "hh.jsonl", "ranking": True,
                 "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
}


def test_llamafactory_dpo_with_dataset_info(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(LF_INFO))
    (tmp_path / "data" / "dpo_en_demo.json").write_text(json.dumps([{
        "conversations": [{"from": "human", "value": "Name a colour."}], "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": {"from": "gpt", "value": "Seven."}}]))
    (tmp_path / "data" / "hh.jsonl").write_text(json.dumps({"question": "2+2?", "good": "4", "bad": "5"}) + "\n")
    cfg, _, err = convert_file(tmp_path, capsys, "from-llamafactory", LF_DPO)
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (
        "sigmoid", 0.1, 8, 16, ["all-linear"])
    assert (cfg.data.max_length, cfg.data.max_rows, cfg.data.num_proc, cfg.precision) == (2048, 1000, 16, "bf16-mixed")
    d = cfg.dpo
    assert (d.batch_size, d.grad_accum, d.lr, d.epochs, d.schedule, d.warmup_ratio) == (1, 8, 5e-6, 3.0, "cosine", 0.1)
    sharegpt, alpaca = cfg.data.mixture
    assert (sharegpt.format, sharegpt.roles["user"], alpaca.format, alpaca.columns) == (
        "sharegpt", "human", "standard", {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert "not mapped: template:" in err and "not mapped: plot_loss:" in err
    train, test, _ = load_rows(cfg.data, "preference", 0)  # the declared columns read the real files
    assert sorted((r.chosen, r.rejected) for r in train + test) == [("4", "5"), ("Blue.", "Seven.")]


@pytest.mark.parametrize("loss, expect", [("orpo", {"name": "orpo", "lambda": 0.1}),
                                          ("simpo", {"name": "simpo", "gamma": 0.5})])
def test_llamafactory_pref_loss(loss, expect, tmp_path):
    from preftune.recipes import convert_llamafactory

    conv = convert_llamafactory({"stage": "dpo", "pref_loss": loss, "model_name_or_path": "m"}, None, tmp_path)
    assert (conv.kind, conv.tree["dpo"]["loss"]) == (loss, expect)


def test_push_to_pushes_the_finished_model_as_preftune_push_does(tiny_model_dir):
    """``push_to`` (TRL's ``push_to_hub`` + ``hub_model_id``) sends the run's model to that repo after
    training; offline, that upload stops with the push command's own message naming the repo."""
    from preftune.commands.training import _push_after
    from preftune.config.validate import config_from_dict

    cfg = config_from_dict(convert_trl({"push_to_hub": True, "hub_model_id": "me/zephyr-dpo", "beta": 0.1,
                                        "rpo_alpha": 0.5}).tree)
    assert cfg.push_to == "me/zephyr-dpo"
    with pytest.raises(PreftuneError, match="HF_HUB_OFFLINE=1 is set, so .* cannot be uploaded to 'me/zephyr-dpo'"):
        _push_after(cfg, tiny_model_dir)
    _push_after(config_from_dict({}), tiny_model_dir)  # no push_to: nothing is pushed
