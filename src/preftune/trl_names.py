"""TRL's and axolotl's config names -> preftune's dotted keys, used two ways: the unknown-key error
names the right key ("TRL's `learning_rate` is `dpo.lr` here"), and the recipe converters
(recipes.py, ``preftune config from-trl``) map every key a recipe sets through this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STAGE = "{stage}"
"""Placeholder in a key for the stage a training argument belongs to (``sft`` or ``dpo``)."""


class Unmappable(ValueError):
    """A value preftune has no equivalent for; the message says why."""


@dataclass(frozen=True)
class Name:
    """One foreign name: the preftune ``key`` it means, who uses it, and how its value converts.

    ``convert`` returns the preftune value, ``None`` when the value is the default there and nothing
    needs writing, or raises Unmappable. ``key=None`` marks a name preftune has no setting for; ``note``
    then says why (or what happens instead)."""

    key: str | None
    source: str = "TRL"
    convert: Callable[[Any], Any] | None = None
    note: str = ""


def _steps(v):
    if isinstance(v, float) and 0 < v < 1:
        raise Unmappable(f"{v} is a fraction of the run; preftune counts these in steps")
    return int(v)


def _warmup_steps(v):
    if float(v) != int(v):
        raise Unmappable(f"{v} is neither a step count nor a fraction below 1")
    return int(v)


def _max_steps(v):
    return None if int(v) <= 0 else int(v)


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant",
             "constant_with_warmup": "constant_with_warmup", "inverse_sqrt": "inverse_sqrt",
             "cosine_with_min_lr": "cosine_with_min_lr", "warmup_stable_decay": "warmup_stable_decay",
             "polynomial": "polynomial"}
"""transformers' ``lr_scheduler_type`` -> preftune's ``schedule`` (the last five run transformers' own functions)."""


def _schedule(v):
    if v not in SCHEDULES:
        raise Unmappable(f"scheduler {v!r}; preftune has {', '.join(sorted(set(SCHEDULES.values())))}")
    return SCHEDULES[v]


OPTIMIZERS = {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw": "adamw", "adamw_torch_fused": "adamw_fused",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit"}
"""transformers' ``optim`` (and axolotl's ``optimizer``) -> preftune's ``optimizer``."""


def _optimizer(v):
    if v not in OPTIMIZERS:
        raise Unmappable(f"optimizer {v!r}; preftune trains with AdamW: {', '.join(sorted(set(OPTIMIZERS.values())))}")
    return OPTIMIZERS[v]


def _eval_strategy(v):
    if v == "epoch":
        raise Unmappable("evaluating once per epoch; preftune evaluates every eval_every steps (and at the end)")
    return 0 if v == "no" else None  # "steps": eval_steps says how often


def _flash(v):
    return "flash_attention_2" if v else None


def _reentrant(v):
    if isinstance(v, dict) and v.get("use_reentrant", False):
        raise Unmappable("use_reentrant: true; preftune checkpoints with use_reentrant: false")
    return None


def _revision(v):
    return None if v in (None, "main") else str(v)


def _bf16(v):
    return "bf16-mixed" if v else None  # TRL's bf16 is autocast over fp32 weights: preftune's bf16-mixed


def _fp16(v):
    if v:
        raise Unmappable("preftune has no fp16; use precision bf16-mixed")
    return None


DTYPES = {"bfloat16": "bf16", "float32": "fp32", "auto": None}


def _dtype(v):
    if v not in DTYPES:
        raise Unmappable(f"dtype {v!r}; preftune loads fp32 or bf16 weights")
    return DTYPES[v]


TRACKERS = ("tensorboard", "wandb", "mlflow")


def _report_to(v):
    names = [v] if isinstance(v, str) else list(v or [])
    names = [] if names in (["none"], []) else names
    other = [n for n in names if n not in TRACKERS]
    if other:
        raise Unmappable(f"tracker(s) {', '.join(map(str, other))}; preftune logs to {', '.join(TRACKERS)}")
    return names


PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")


def _loss(v):
    names = [v] if isinstance(v, str) else list(v)
    losses = [n for n in names if n != "sft"]
    if len(losses) != 1 or losses[0] not in PREFERENCE_LOSSES:
        raise Unmappable(f"loss_type {v!r}; preftune's losses are {', '.join(PREFERENCE_LOSSES)} "
                         "(plus 'sft', as dpo.sft_weight)")
    return losses[0]


def _metric(v):
    name = str(v).removeprefix("eval_").removeprefix("eval/")
    return f"eval/{name}"


def _mode(v):
    return "max" if v else "min"


def _precomputed(v):
    return "precomputed" if v else None


def _packed(v):
    return "packed" if v else None


def _rl(v):
    if v not in ("dpo", "ipo", "orpo", "simpo"):
        raise Unmappable(f"rl: {v!r}; preftune trains dpo, ipo, orpo and simpo")
    return "sigmoid" if v == "dpo" else v


def _adapter(v):
    if v not in ("lora", "qlora", None):
        raise Unmappable(f"adapter {v!r}; preftune trains LoRA and QLoRA adapters")
    return v is not None


def _ratio_or_rows(v):
    if isinstance(v, int) and v >= 1:
        raise Unmappable(f"{v} rows; preftune's data.test_size is a fraction")
    return float(v)


NAMES: dict[str, Name] = {
    # transformers' TrainingArguments, as TRL's configs inherit them
    "learning_rate": Name(f"{STAGE}.lr", "TRL/axolotl", float),
    "num_train_epochs": Name(f"{STAGE}.epochs", "TRL", float),
    "max_steps": Name(f"{STAGE}.max_steps", "TRL/axolotl", _max_steps),
    "per_device_train_batch_size": Name(f"{STAGE}.batch_size", "TRL", int),
    "per_device_eval_batch_size": Name(f"{STAGE}.eval_batch_size", "TRL", int),
    "gradient_accumulation_steps": Name(f"{STAGE}.grad_accum", "TRL/axolotl", int),
    "lr_scheduler_type": Name(f"{STAGE}.schedule", "TRL", _schedule),
    "warmup_ratio": Name(f"{STAGE}.warmup_ratio", "TRL/axolotl", float),
    "weight_decay": Name(f"{STAGE}.weight_decay", "TRL/axolotl", float),
    "max_grad_norm": Name(f"{STAGE}.max_grad_norm", "TRL/axolotl", float),
    "gradient_checkpointing": Name(f"{STAGE}.gradient_checkpointing", "TRL/axolotl", bool),
    "activation_checkpointing": Name(f"{STAGE}.gradient_checkpointing", "TRL", bool),
    "eval_steps": Name(f"{STAGE}.eval_every", "TRL/axolotl", _steps),
    "logging_steps": Name(f"{STAGE}.log_every", "TRL/axolotl", _steps),
    "save_steps": Name(f"{STAGE}.save_every", "TRL/axolotl", _steps),
    "save_total_limit": Name(f"{STAGE}.save_total_limit", "TRL/axolotl", int),
    "metric_for_best_model": Name(f"{STAGE}.early_stopping_metric", "TRL", _metric),
    "greater_is_better": Name(f"{STAGE}.early_stopping_mode", "TRL", _mode),
    "load_best_model_at_end": Name(None, "TRL", note="preftune always keeps best/ by the early-stopping metric"),
    "eval_strategy": Name(f"{STAGE}.eval_every", "TRL", _eval_strategy, "steps: eval_steps is dpo.eval_every"),
    "evaluation_strategy": Name(f"{STAGE}.eval_every", "TRL", _eval_strategy, "steps: eval_steps is dpo.eval_every"),
    "save_strategy": Name(None, "TRL", note="preftune saves every save_every steps and at the end"),
    "seed": Name("seed", "TRL/axolotl", int),
    "output_dir": Name("output_dir", "TRL/axolotl", str),
    "bf16": Name("precision", "TRL/axolotl", _bf16, "bf16: true is precision: bf16-mixed"),
    "fp16": Name("precision", "TRL/axolotl", _fp16, "preftune has fp32, bf16 and bf16-mixed"),
    "use_cpu": Name(None, "TRL", note="preftune (through accelerate) uses a GPU when there is one"),
    "report_to": Name("report_to", "TRL", _report_to),
    "optim": Name(f"{STAGE}.optimizer", "TRL", _optimizer),
    "lr_scheduler_kwargs": Name(f"{STAGE}.schedule_kwargs", "TRL", dict),
    "gradient_checkpointing_kwargs": Name(f"{STAGE}.gradient_checkpointing", "TRL", _reentrant,
                                          "preftune checkpoints with use_reentrant: false"),
    "push_to_hub": Name(None, "TRL", note="set push_to to the Hub repo id (TRL's hub_model_id) to push after training"),
    "hub_model_id": Name("push_to", "TRL", str, "the model is pushed there after training"),
    "preprocessing_num_workers": Name("data.num_proc", "TRL", int),
    "dataset_num_proc": Name("data.num_proc", "TRL", int),
    "chat_template": Name("data.chat_template", "TRL/axolotl", str),
    "chat_template_path": Name("data.chat_template", "TRL", str),
    "warmup_steps": Name(f"{STAGE}.warmup_steps", "TRL/axolotl", _warmup_steps, "below 1 it is a fraction: dpo.warmup_ratio"),
    # DPOConfig (and older TRL names)
    "beta": Name("dpo.beta", "TRL", float),
    "loss_type": Name("dpo.loss", "TRL", _loss),
    "label_smoothing": Name("dpo.label_smoothing", "TRL", float),
    "rpo_alpha": Name("dpo.sft_weight", "TRL", float),
    "simpo_gamma": Name("dpo.gamma", "TRL", float),
    "max_length": Name("data.max_length", "TRL", int),
    "max_prompt_length": Name("data.max_prompt_length", "TRL", int),
    "precompute_ref_log_probs": Name("dpo.reference", "TRL", _precomputed, "dpo.reference: precomputed"),
    "padding_free": Name("dpo.layout", "TRL", _packed, "dpo.layout: packed"),
    "loss_weights": Name(None, "TRL", note="read with loss_type: an 'sft' entry's weight becomes dpo.sft_weight"),
    # SFTConfig
    "completion_only_loss": Name("sft.completion_only", "TRL", bool),
    "assistant_only_loss": Name("sft.completion_only", "TRL", bool),
    "packing": Name(None, "TRL", note="preftune's SFT batches are padded, not packed"),
    "dataset_text_field": Name(None, "TRL", note="preftune reads the text, messages or prompt/completion columns "
                                                 "itself (data.format)"),
    # ModelConfig and the scripts' arguments
    "model_name_or_path": Name("model", "TRL", str),
    "dtype": Name("precision", "TRL", _dtype, "bfloat16 is precision: bf16"),
    "torch_dtype": Name("precision", "TRL", _dtype, "bfloat16 is precision: bf16"),
    "attn_implementation": Name("attn_implementation", "TRL", str),
    "use_flash_attention_2": Name("attn_implementation", "TRL", _flash, "true is attn_implementation: flash_attention_2"),
    "model_revision": Name("model_revision", "TRL", _revision),
    "use_peft": Name("lora.enabled", "TRL", bool, "preftune trains LoRA unless lora.enabled: false"),
    "lora_r": Name("lora.r", "TRL/axolotl", int),
    "lora_alpha": Name("lora.alpha", "TRL/axolotl", int),
    "lora_dropout": Name("lora.dropout", "TRL/axolotl", float),
    "lora_target_modules": Name("lora.target_modules", "TRL/axolotl", lambda v: [v] if isinstance(v, str) else list(v)),
    "load_in_4bit": Name("lora.quantize_4bit", "TRL/axolotl", bool),
    "dataset_name": Name("data.source", "TRL", str),
    "dataset_config": Name("data.subset", "TRL", str),
    "dataset_train_split": Name("data.split", "TRL", str),
    "dataset_test_split": Name("data.test_split", "TRL", str),
    # axolotl
    "base_model": Name("model", "axolotl", str),
    "micro_batch_size": Name(f"{STAGE}.batch_size", "axolotl", int),
    "eval_batch_size": Name(f"{STAGE}.eval_batch_size", "axolotl", int),
    "num_epochs": Name(f"{STAGE}.epochs", "axolotl", float),
    "lr_scheduler": Name(f"{STAGE}.schedule", "axolotl", _schedule),
    "optimizer": Name(f"{STAGE}.optimizer", "axolotl", _optimizer),
    "sequence_len": Name("data.max_length", "axolotl", int),
    "val_set_size": Name("data.test_size", "axolotl", _ratio_or_rows),
    "rl": Name("dpo.loss", "axolotl", _rl),
    "rl_beta": Name("dpo.beta", "axolotl", float),
    "adapter": Name("lora.enabled", "axolotl", _adapter),
    "orpo_alpha": Name("dpo.orpo_lambda", "axolotl", float),
}
"""Foreign name -> its preftune meaning. ``{stage}`` in a key is ``dpo`` or ``sft``."""


def preftune_key(name: str, stage: str) -> str | None:
    """The preftune key a foreign ``name`` means in ``stage`` (``sft``/``dpo``), or None."""
    entry = NAMES.get(name)
    return entry.key.replace(STAGE, stage) if entry and entry.key else None


def hint(key: str, prefix: str = "") -> str | None:
    """The unknown-key hint for a foreign name at ``prefix`` (``""``, ``"dpo."``, ``"sft."``, ...).

    ``hint("learning_rate", "dpo.")`` -> "TRL's `learning_rate` is `dpo.lr` here"; None when ``key`` is
    not a TRL or axolotl name."""
    entry = NAMES.get(key)
    if entry is None:
        return None
    who = "TRL's" if entry.source.startswith("TRL") else "axolotl's"
    if entry.key is None:
        return f"{who} `{key}` has no preftune setting: {entry.note}"
    section = prefix.split(".", 1)[0]
    if STAGE in entry.key and section not in ("sft", "dpo"):
        keys = f"`{entry.key.replace(STAGE, 'dpo')}` (or `{entry.key.replace(STAGE, 'sft')}`)"
    else:
        keys = f"`{entry.key.replace(STAGE, section if section in ('sft', 'dpo') else 'dpo')}`"
    return f"{who} `{key}` is {keys} here" + (f"; {entry.note}" if entry.note else "")
