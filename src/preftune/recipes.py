"""Recipes users bring from other tools -> preftune config mappings: ``config from-trl`` (TRL's trainers
and the alignment-handbook's recipes), ``config from-axolotl`` and ``config from-llamafactory``. A
conversion fills in the tool's own defaults for what the recipe leaves out, lists what it cannot map
(with the reason) and says which trainer it assumed when the recipe does not say. Nothing here loads
models or data; the name table for the unknown-key hints is trl_names.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preftune.errors import PreftuneError
from preftune.trl_names import NAMES, STAGE, Unmappable

KINDS = ("dpo", "orpo", "cpo", "simpo", "kto", "sft", "rm")
"""TRL's trainers a recipe can be for (``simpo`` is TRL's CPOTrainer with ``loss_type: simpo``)."""

TRAINING_ARGUMENTS = {
    "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "save_steps": 500, "seed": 42, "optim": "adamw_torch_fused",
}
"""transformers' TrainingArguments defaults that preftune's differ from (TRL's configs inherit them)."""
TRL_COMMON = {"logging_steps": 10, "gradient_checkpointing": True, "bf16": True, "max_length": 1024}
"""What TRL 1.16's trainer configs change of those (``bf16: None`` means true unless ``fp16`` is set)."""
TRL_KIND = {
    "dpo": {"learning_rate": 1e-6, "beta": 0.1, "loss_type": ["sigmoid"]},
    "orpo": {"learning_rate": 1e-6, "beta": 0.1},
    "cpo": {"learning_rate": 1e-6, "beta": 0.1, "loss_type": "sigmoid", "cpo_alpha": 1.0, "simpo_gamma": 0.5},
    "simpo": {"learning_rate": 1e-6, "beta": 0.1, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5},
    "kto": {"learning_rate": 1e-6, "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "sft": {"learning_rate": 2e-5},
    "rm": {"learning_rate": 1e-4},
}
"""Each trainer config's own defaults in TRL 1.16 (``simpo``: CPOConfig as SimPO sets it, no NLL term)."""


def trl_defaults(kind: str) -> dict:
    """What a TRL 1.16 recipe for ``kind`` means by every key it leaves out (that preftune sets otherwise)."""
    return TRAINING_ARGUMENTS | TRL_COMMON | TRL_KIND[kind]


SIGNATURE_KEYS = {
    "dpo": {"rpo_alpha", "ref_model_sync_steps", "ref_model_mixup_alpha", "sync_ref_model", "precompute_ref_log_probs",
            "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "ld_alpha", "reference_free",
            "loss_weights", "ref_adapter_name", "model_adapter_name", "force_use_ref_model", "discopop_tau"},
    "cpo": {"cpo_alpha"},
    "simpo": {"gamma_beta_ratio", "sft_weight"},
    "kto": {"desirable_weight", "undesirable_weight"},
    "rm": {"center_rewards_coefficient"},
    "sft": {"packing", "dataset_text_field", "completion_only_loss", "assistant_only_loss", "packing_strategy",
            "eval_packing", "chat_template_path"},
}
"""Keys that only one trainer's config (or its recipes) has: their presence settles the kind."""
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
"""TRL 1.16's DPOConfig loss types; each is a loss of preftune's table under the same name."""
LOSS_KIND = {**{n: "dpo" for n in DPO_LOSSES}, "simpo": "simpo", "alphapo": "cpo", "kto": "kto",
             "apo_zero_unpaired": "kto", "nll": "sft", "dft": "sft"}


@dataclass
class Conversion:
    """A converted recipe: the preftune mapping, the trainer it was read as, what could not be mapped
    (``key: why``) and ``notes``: the assumptions the reader must see (an uncertain trainer first)."""

    tree: dict
    kind: str
    unmapped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self, command: str) -> str:
        """The YAML file: a header of comments (the command, the trainer, the notes, the unmapped keys)."""
        head = [f"# converted by `{command}` (trainer: {self.kind})"]
        head += [f"# NOTE: {n}" for n in self.notes] + [f"# not mapped: {u}" for u in self.unmapped]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.tree, sort_keys=False, allow_unicode=True)


def put(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def read_recipe(path: str | Path, command: str) -> dict:
    """A recipe file (YAML or JSON) as one mapping; errors name the file and the command."""
    p = Path(path)
    if not p.is_file():
        raise PreftuneError(f"config {command}: file not found: {p}")
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise PreftuneError(f"config {command}: {p} is not valid {kind}: {e}") from None
    if not isinstance(raw, dict):
        raise PreftuneError(f"config {command}: {p} must hold a mapping of setting names to values")
    return raw


# ---------------------------------------------------------------- which trainer


_NAME_HINT = re.compile(r"(?<![a-z])(orpo|simpo|cpo|kto|sft|dpo)(?![a-z])")


def guess_kind(raw: dict) -> tuple[str, str | None]:
    """``(kind, None)`` when the recipe's keys settle which TRL trainer it is for, else ``(kind, why it
    was assumed)``: from a name the recipe gives its run (``output_dir``, ``hub_model_id``, ``run_name``),
    or DPO. A recipe whose keys belong to two trainers is an error asking for ``--kind``."""
    found: dict[str, str] = {}
    for kind, keys in SIGNATURE_KEYS.items():
        for k in sorted(raw.keys() & keys):
            found.setdefault(kind, f"`{k}`")
    losses = raw.get("loss_type")
    for name in [losses] if isinstance(losses, str) else list(losses or []):
        if name in LOSS_KIND and name != "sft":
            found.setdefault(LOSS_KIND[name], f"`loss_type: {name}`")
    if "simpo_gamma" in raw and not found.keys() & {"cpo", "simpo"}:
        found["simpo"] = "`simpo_gamma`"
    if {"cpo", "simpo"} <= found.keys() and "simpo" in str(losses):
        del found["cpo"]  # CPOConfig with loss_type simpo: SimPO (with cpo_alpha, CPO-SimPO)
    if len(found) > 1:
        clash = ", ".join(f"{k} ({why})" for k, why in found.items())
        raise PreftuneError(f"config from-trl: the recipe has keys of several TRL trainers: {clash}; pass "
                            f"--kind {'|'.join(KINDS)}")
    if found:
        return next(iter(found)), None
    for key in ("hub_model_id", "output_dir", "run_name"):
        m = _NAME_HINT.search(str(raw.get(key, "")).lower())
        if m:
            return m.group(1), (f"no key settles the trainer; assumed {m.group(1).upper()} from {key}: "
                                f"{raw[key]!r}. Pass --kind {'|'.join(KINDS)} if that is wrong")
    return "dpo", ("no key settles the trainer (DPO, ORPO, CPO and KTO recipes share `beta`); assumed DPO. "
                   f"Pass --kind {'|'.join(KINDS)} if the recipe is for another trainer")


# ---------------------------------------------------------------- the loss of each trainer


def _names(v) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _dpo_loss(raw: dict, unmapped: list[str]) -> Any:
    """DPOConfig's ``loss_type`` (a name or a list, with ``loss_weights``) and ``rpo_alpha``."""
    names = _names(raw["loss_type"])
    bad = [n for n in names if n not in (*DPO_LOSSES, "sft")]
    if bad:
        unmapped.append(f"loss_type: {', '.join(map(str, bad))} is not a DPOConfig loss preftune has; trained with sigmoid")
        names = [n for n in names if n not in bad] or ["sigmoid"]
    weights = raw.get("loss_weights") or [1.0] * len(names)
    if len(weights) != len(names):
        unmapped.append(f"loss_weights: {len(weights)} weights for {len(names)} losses; weights left out")
        weights = [1.0] * len(names)
    terms = [{"name": n} | ({"weight": float(w)} if float(w) != 1.0 else {}) for n, w in zip(names, weights)]
    if raw.get("rpo_alpha"):
        terms.append({"name": "sft", "weight": float(raw["rpo_alpha"])})
    return terms[0]["name"] if len(terms) == 1 and len(terms[0]) == 1 else terms


def _cpo_loss(raw: dict, kind: str, unmapped: list[str]) -> Any:
    """CPOConfig: ``loss_type`` sigmoid is CPO (``cpo_alpha`` its NLL weight); simpo and alphapo add
    ``cpo_alpha`` as an NLL term (CPO-SimPO; 0 is plain SimPO). The SimPO repository's recipes write
    ``gamma_beta_ratio`` (gamma = ratio * beta) and ``sft_weight``."""
    loss = raw.get("loss_type", "sigmoid")
    alpha = float(raw.get("sft_weight", raw.get("cpo_alpha", 1.0)))
    smoothing = {"label_smoothing": float(raw["label_smoothing"])} if raw.get("label_smoothing") else {}
    if loss == "sigmoid":
        return {"name": "cpo", "alpha": alpha} | smoothing
    if loss not in ("simpo", "alphapo"):
        unmapped.append(f"loss_type: CPO's {loss!r} variant is not in preftune's loss table; trained as CPO (sigmoid)")
        return {"name": "cpo", "alpha": alpha} | smoothing
    gamma = float(raw.get("simpo_gamma", 0.5))
    if "gamma_beta_ratio" in raw:
        gamma = float(raw["gamma_beta_ratio"]) * float(raw.get("beta", 0.1))
    term = {"name": loss, "gamma": gamma} | smoothing | ({"alpha": float(raw["alpha"])} if loss == "alphapo" and "alpha" in raw else {})
    return [term, {"name": "sft", "weight": alpha}] if alpha else term


def trl_loss(raw: dict, kind: str, unmapped: list[str]) -> Any:
    """``dpo.loss`` for a recipe of ``kind`` (with TRL's defaults filled in); ORPO's ``beta`` is its lambda."""
    if kind == "dpo":
        return _dpo_loss(raw, unmapped)
    if kind == "orpo":
        return {"name": "orpo", "lambda": float(raw["beta"])}
    if kind == "kto":
        loss = raw.get("loss_type", "kto")
        if loss not in ("kto", "apo_zero_unpaired"):
            unmapped.append(f"loss_type: KTO's {loss!r} is not in preftune's loss table; trained with kto")
            loss = "kto"
        return {"name": loss, "desirable_weight": float(raw["desirable_weight"]),
                "undesirable_weight": float(raw["undesirable_weight"])}
    return _cpo_loss(raw, kind, unmapped)


_CPO_KEYS = frozenset({"beta", "loss_type", "cpo_alpha", "simpo_gamma", "gamma_beta_ratio", "sft_weight", "alpha",
                       "label_smoothing"})
LOSS_KEYS = {"dpo": frozenset({"loss_type", "loss_weights", "rpo_alpha"}), "orpo": frozenset({"beta"}),
             "kto": frozenset({"beta", "loss_type", "desirable_weight", "undesirable_weight"}),
             "cpo": _CPO_KEYS, "simpo": _CPO_KEYS, "sft": frozenset(), "rm": frozenset({"center_rewards_coefficient"})}
"""Keys each kind's loss reads (``trl_loss``), not through the name table."""


# ---------------------------------------------------------------- data: dataset_mixer, dataset_mixture


DATA_KEYS = frozenset({"dataset_mixer", "dataset_splits", "dataset_mixture", "dataset_name", "dataset_config",
                       "dataset_train_split", "dataset_test_split"})


def _handbook_splits(splits: list, unmapped: list[str]) -> dict:
    """alignment-handbook's ``dataset_splits`` (``[train_prefs, test_prefs]``) -> split and test_split."""
    train = [s for s in splits if "train" in str(s)]
    test = [s for s in splits if "test" in str(s) or "val" in str(s)]
    if len(train) > 1 or len(test) > 1:
        unmapped.append(f"dataset_splits: {splits}; preftune reads one training and one held-out split, "
                        f"kept {train[:1] + test[:1]}")
    out = {"split": train[0]} if train else {}
    return out | {"test_split": test[0] if test else None}


def trl_data(raw: dict, unmapped: list[str]) -> dict:
    """The ``data`` settings of a recipe's dataset keys: TRL's ``dataset_name``/``dataset_config``/splits,
    alignment-handbook's ``dataset_mixer`` (dataset -> fraction of its training split) with
    ``dataset_splits``, or a ``dataset_mixture`` of ``datasets`` entries. One whole dataset becomes
    ``data.source``; several, or a fraction, a weighted ``data.mixture``."""
    out: dict = {}
    if "dataset_name" in raw:
        out["source"] = str(raw["dataset_name"])
    if raw.get("dataset_config"):
        out["subset"] = str(raw["dataset_config"])
    if "dataset_train_split" in raw:
        out["split"] = str(raw["dataset_train_split"])
    if "dataset_test_split" in raw:
        out["test_split"] = raw["dataset_test_split"]
    sources: list[dict] = []
    mixer = raw.get("dataset_mixer")
    if isinstance(mixer, dict):
        sources = [{"source": str(name), "fraction": float(frac)} for name, frac in mixer.items()]
        out |= _handbook_splits(list(raw.get("dataset_splits") or ["train", "test"]), unmapped)
    mixture = raw.get("dataset_mixture")
    if isinstance(mixture, dict):
        for i, d in enumerate(mixture.get("datasets") or []):
            entry = {"source": str(d.get("id") or d.get("path")), "fraction": float(d.get("weight", 1.0))}
            if d.get("config") or d.get("name"):
                entry["subset"] = str(d.get("config") or d.get("name"))
            if d.get("split"):
                entry["split"] = str(d["split"])
            if d.get("columns"):
                unmapped.append(f"dataset_mixture.datasets[{i}].columns: preftune reads the columns its format "
                                "needs and ignores the rest")
            sources.append(entry)
        if mixture.get("test_split_size"):
            out |= {"test_split": None, "test_size": float(mixture["test_split_size"])}
    if len(sources) == 1 and sources[0]["fraction"] == 1.0:
        out |= {k: v for k, v in sources[0].items() if k != "fraction"}
    elif sources:
        out["mixture"] = sources
    return out


# ---------------------------------------------------------------- config from-trl


def _precision(raw: dict, unmapped: list[str]) -> str | None:
    """``dtype`` bfloat16 loads bf16 weights (preftune's bf16); else TRL's ``bf16`` (true unless ``fp16``)
    is autocast over fp32 weights (bf16-mixed)."""
    dtype = raw.get("dtype", raw.get("torch_dtype"))
    if dtype == "bfloat16":
        return "bf16"
    if dtype not in (None, "auto", "float32"):
        unmapped.append(f"dtype: {dtype!r}; preftune loads fp32 or bf16 weights")
    if raw.get("fp16"):
        unmapped.append("fp16: preftune has no fp16; use precision bf16-mixed")
        return None
    return "bf16-mixed" if raw.get("bf16") else None


PRECISION_KEYS = frozenset({"bf16", "fp16", "dtype", "torch_dtype"})
PUSH_KEYS = frozenset({"push_to_hub", "hub_model_id"})
NOT_SETTINGS = {
    "do_train": "preftune trains when you run it", "do_eval": "preftune evaluates on the held-out split",
    "overwrite_output_dir": "preftune refuses a used output_dir unless --resume",
    "log_level": "preftune logs at INFO", "logging_strategy": "preftune logs every log_every steps",
    "logging_first_step": "preftune logs every log_every steps", "run_name": "preftune names a run by output_dir",
    "hub_strategy": "preftune pushes the finished model once", "remove_unused_columns": "preftune reads the columns its format needs",
    "max_completion_length": "preftune caps prompt + completion with data.max_length (and the prompt with "
                             "data.max_prompt_length)",
    "truncation_mode": "preftune keeps the prompt's last tokens and the completion's first",
}
"""Recipe keys that are not settings in preftune, with what happens instead."""


def convert_trl(raw: dict, kind: str | None = None) -> Conversion:
    """A flat TRL (or alignment-handbook) recipe -> a Conversion for TRL's trainer ``kind`` (guessed
    when None; the guess is a note when the keys do not settle it). TRL 1.16's defaults fill what the
    recipe leaves out, so it trains in preftune as it did in TRL. A preference recipe becomes a
    preference-only run (``sft.enabled: false``: TRL's preference trainers start from a model that is
    already fine-tuned), an SFT recipe an SFT-only run. LoRA is on only with ``use_peft``."""
    notes: list[str] = []
    if kind is None:
        kind, why = guess_kind(raw)
        notes += [why] if why else []
    if kind not in KINDS:
        raise PreftuneError(f"config from-trl: --kind must be one of {', '.join(KINDS)}, got {kind!r}")
    raw = trl_defaults(kind) | raw
    stage = {"sft": "sft", "rm": "rm"}.get(kind, "dpo")
    conv = Conversion({"sft": {"enabled": kind == "sft"}, "dpo": {"enabled": stage == "dpo"}}, kind, notes=notes)
    if kind == "rm":  # RewardTrainer: a Bradley-Terry reward model (``preftune rm``)
        put(conv.tree, "rm.enabled", True)
        if raw.get("center_rewards_coefficient") is not None:
            put(conv.tree, "rm.center_rewards_coefficient", float(raw["center_rewards_coefficient"]))
    if not raw.get("use_peft"):
        put(conv.tree, "lora.enabled", False)
    elif "lora_target_modules" not in raw:
        conv.unmapped.append("lora_target_modules: unset in TRL adapts peft's default modules of the architecture "
                             "(q_proj and v_proj for Llama); preftune adapts every linear layer (lora.target_modules)")
    if stage == "dpo":
        put(conv.tree, "dpo.loss", trl_loss(raw, kind, conv.unmapped))
        if kind not in ("dpo", "orpo"):
            put(conv.tree, "dpo.beta", float(raw["beta"]))
    if (precision := _precision(raw, conv.unmapped)) is not None:
        put(conv.tree, "precision", precision)
    data_prefix = "sft.data" if kind == "sft" and raw.keys() & DATA_KEYS else "data"
    for k, v in trl_data(raw, conv.unmapped).items():
        put(conv.tree, f"{data_prefix}.{k}", v)
    if raw.get("push_to_hub"):  # TRL pushes to hub_model_id, else to the output folder's name
        put(conv.tree, "push_to", str(raw.get("hub_model_id") or Path(str(raw.get("output_dir", "model"))).name))
    _map_names(raw, kind, stage, DATA_KEYS | PRECISION_KEYS | LOSS_KEYS[kind] | PUSH_KEYS, conv)
    return conv


TOP_LEVEL_DATA = frozenset({"data.chat_template"})
"""``data`` keys that serve every stage (the tokenizer's template), even when an SFT recipe's data is sft.data."""


def _map_names(raw: dict, kind: str, stage: str, skip: frozenset | set, conv: Conversion) -> None:
    """Every other key through the name table (trl_names.NAMES): converted, or listed with the reason."""
    sft_data = kind == "sft" and bool(raw.keys() & DATA_KEYS)
    for name, value in raw.items():
        if name in skip:
            continue
        entry = NAMES.get(name)
        if kind == "sft" and name == "loss_type":  # SFTConfig's loss_type: nll is preftune's SFT loss
            if value not in ("nll", ["nll"]):
                conv.unmapped.append(f"{name}: {value!r}; preftune's SFT loss is the token-mean NLL ('nll')")
            continue
        if entry is None or entry.key is None:
            why = NOT_SETTINGS.get(name) or (entry.note if entry else "not a setting preftune knows")
            conv.unmapped.append(f"{name}: {why}")
            continue
        _put_converted(conv, name, value, entry.key.replace(STAGE, stage), "sft.data" if sft_data else None)


# ---------------------------------------------------------------- config from-axolotl


def put_sources(conv: Conversion, sources: list[dict], stage: str) -> str:
    """A recipe's datasets as the data section (``sft.data`` for an SFT recipe): one source as it is,
    several as a mixture, each whole. Returns the section's key."""
    data = "sft.data" if stage == "sft" and sources else "data"
    if len(sources) == 1:
        for k, v in sources[0].items():
            put(conv.tree, f"{data}.{k}", v)
    elif sources:
        put(conv.tree, f"{data}.mixture", [s | {"fraction": 1.0} for s in sources])
    return data




AXOLOTL_RL = {"dpo": "dpo", "ipo": "dpo", "orpo": "orpo", "kto": "kto", "simpo": "simpo"}
AXOLOTL_ROWS = {
    "intel": ("standard", {"prompt": "question"}), "icr": ("standard", {"prompt": "input"}),
    "argilla": ("standard", {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"}),
    "prompt_pairs": ("standard", {}), "ultra": ("auto", {}), "argilla_chat": ("auto", {}),
}
"""axolotl's preference dataset ``type`` (after its ``chatml.``/``llama3.`` template prefix) -> (format, columns)."""
AXOLOTL_KTO_ROWS = {"intel": {"prompt": "question"}, "argilla": {"prompt": "instruction"}, "ultra": {}}
AXOLOTL_SFT_ROWS = {"alpaca": "alpaca", "sharegpt": "sharegpt", "chat_template": "messages"}
AXOLOTL_KEYS = {
    "base_model": "model", "tokenizer_config": "tokenizer", "revision_of_model": "model_revision",
    "sequence_len": "data.max_length", "micro_batch_size": "{stage}.batch_size",
    "gradient_accumulation_steps": "{stage}.grad_accum", "num_epochs": "{stage}.epochs",
    "max_steps": "{stage}.max_steps", "learning_rate": "{stage}.lr", "weight_decay": "{stage}.weight_decay",
    "max_grad_norm": "{stage}.max_grad_norm", "warmup_ratio": "{stage}.warmup_ratio",
    "gradient_checkpointing": "{stage}.gradient_checkpointing", "eval_steps": "{stage}.eval_every",
    "save_steps": "{stage}.save_every", "logging_steps": "{stage}.log_every", "save_total_limit": "{stage}.save_total_limit",
    "output_dir": "output_dir", "seed": "seed", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules", "load_in_4bit": "lora.quantize_4bit",
    "trust_remote_code": "trust_remote_code", "hub_model_id": "push_to", "dataset_processes": "data.num_proc",
    "chat_template_jinja": "data.chat_template",
}
"""axolotl keys that carry over as they are (NAMES' converters still apply to the values)."""


def _axolotl_dataset(d: dict, i: int, kind: str, unmapped: list[str]) -> dict | None:
    """One entry of axolotl's ``datasets`` -> a ``data.mixture`` entry (source, split, format, columns, roles)."""
    where = f"datasets[{i}]"
    typ = d.get("type")
    entry: dict = {"source": str(d.get("path"))}
    if d.get("name"):
        entry["subset"] = str(d["name"])
    if d.get("split"):
        entry["split"] = str(d["split"])
    if isinstance(typ, dict):  # user_defined: the field names are given
        cols = {k: typ[f"field_{k}"] for k in ("prompt", "chosen", "rejected", "system", "completion", "label")
                if typ.get(f"field_{k}")}
        if any(k.endswith("_format") for k in typ):
            unmapped.append(f"{where}.type: its *_format strings rewrite the text; preftune renders with the chat template")
        return entry | {"columns": cols}
    family, _, rows = str(typ).partition(".")
    if family == "chat_template":
        fields = {"prompt": "field_messages", "chosen": "field_chosen", "rejected": "field_rejected"}
        cols = {k: d[f] for k, f in fields.items() if d.get(f)}
        props = d.get("message_property_mappings") or {}
        roles = {"role_key": props["role"]} if props.get("role", "role") != "role" else {}
        roles |= {"content_key": props["content"]} if props.get("content", "content") != "content" else {}
        if kind == "sft":
            entry["format"] = "messages"
            cols = {"messages": d["field_messages"]} if d.get("field_messages") else {}
        return entry | ({"columns": cols} if cols else {}) | ({"roles": roles} if roles else {})
    if kind == "sft" and family in AXOLOTL_SFT_ROWS:
        return entry | {"format": AXOLOTL_SFT_ROWS[family]}
    table = AXOLOTL_KTO_ROWS if kind == "kto" else {k: v[1] for k, v in AXOLOTL_ROWS.items()}
    if rows not in table:
        unmapped.append(f"{where}.type: {typ!r} is not an axolotl row type preftune maps; dataset left out "
                        "(set data.columns for its columns)")
        return None
    fmt = "kto" if kind == "kto" else AXOLOTL_ROWS[rows][0]
    unmapped.append(f"{where}.type: axolotl renders {typ!r} rows with its {family} template; preftune renders "
                    "them with the tokenizer's (or data.chat_template)")
    return entry | ({"format": fmt} if fmt != "auto" else {}) | ({"columns": table[rows]} if table[rows] else {})


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
"""ChatML as a Jinja chat template (axolotl's ``chat_template: chatml``)."""


def _axolotl_special(raw: dict, stage: str, conv: Conversion) -> set[str]:
    """axolotl's keys whose meaning is not a plain rename; returns the keys it read."""
    t, u = conv.tree, conv.unmapped
    if raw.get("adapter") in ("lora", "qlora"):
        put(t, "lora.enabled", True)
        if raw["adapter"] == "qlora":
            put(t, "lora.quantize_4bit", True)
    elif raw.get("adapter"):
        u.append(f"adapter: {raw['adapter']!r}; preftune trains LoRA and QLoRA adapters")
    if raw.get("lora_target_linear"):
        put(t, "lora.target_modules", ["all-linear"])
    if raw.get("flash_attention"):
        put(t, "attn_implementation", "flash_attention_2")
    elif raw.get("sdp_attention"):
        put(t, "attn_implementation", "sdpa")
    if raw.get("bf16") in (True, "auto"):
        put(t, "precision", "bf16-mixed")
    if raw.get("fp16"):
        u.append("fp16: preftune has no fp16; use precision bf16-mixed")
    template = raw.get("chat_template")
    if template == "chatml":
        put(t, "data.chat_template", CHATML)
    elif template not in (None, "tokenizer_default", "jinja"):
        u.append(f"chat_template: axolotl's built-in {template!r}; preftune takes the Jinja text itself "
                 "(data.chat_template) or uses the tokenizer's own")
    if "train_on_inputs" in raw and stage == "sft":
        put(t, "sft.completion_only", not raw["train_on_inputs"])
    if raw.get("wandb_project"):
        put(t, "report_to", ["wandb"])
    if "val_set_size" in raw:
        put(t, "data.test_split", None)  # axolotl carves val_set_size off the training rows
    return {"adapter", "lora_target_linear", "flash_attention", "sdp_attention", "bf16", "fp16", "chat_template",
            "train_on_inputs", "wandb_project", "wandb_entity", "wandb_name", "wandb_log_model"}


def _axolotl_loss_keys(raw: dict, kind: str) -> dict:
    """axolotl's loss keys in TRL's names (``rl_beta`` is beta, ORPO's ``orpo_alpha`` its lambda), with
    TRL's defaults, for ``trl_loss``."""
    return {"loss_type": {"ipo": "ipo", "simpo": "simpo"}.get(raw.get("rl"), "sigmoid"),
            "beta": float(raw.get("orpo_alpha", 0.1) if kind == "orpo" else raw.get("rl_beta", 0.1)),
            "cpo_alpha": float(raw.get("cpo_alpha", 0.0)), "simpo_gamma": float(raw.get("simpo_gamma", 0.5)),
            "desirable_weight": raw.get("kto_desirable_weight", 1.0),
            "undesirable_weight": raw.get("kto_undesirable_weight", 1.0)}


def convert_axolotl(raw: dict) -> Conversion:
    """An axolotl config -> a Conversion: ``rl`` (dpo, ipo, orpo, kto, simpo; none is SFT) picks the
    loss, its ``datasets`` become ``data.mixture`` entries with the columns each ``type`` names, and
    axolotl's other keys map through AXOLOTL_KEYS and NAMES. LoRA is on only with ``adapter``."""
    rl = raw.get("rl")
    if rl is not None and rl not in AXOLOTL_RL:
        raise PreftuneError(f"config from-axolotl: rl: {rl!r}; preftune trains {', '.join(AXOLOTL_RL)} (or SFT without rl)")
    kind = AXOLOTL_RL.get(rl, "sft")
    stage = "sft" if kind == "sft" else "dpo"
    conv = Conversion({"sft": {"enabled": kind == "sft"}, "dpo": {"enabled": kind != "sft"},
                       "lora": {"enabled": False}}, kind)
    if stage == "dpo":
        put(conv.tree, "dpo.loss", trl_loss(_axolotl_loss_keys(raw, kind), kind, conv.unmapped))
        put(conv.tree, "dpo.beta", float(raw.get("rl_beta", 0.1)))
    read = _axolotl_special(raw, stage, conv) | {"rl", "rl_beta", "orpo_alpha", "cpo_alpha", "simpo_gamma",
                                                   "kto_desirable_weight", "kto_undesirable_weight", "datasets"}
    sources = [e for i, d in enumerate(raw.get("datasets") or [])
               if (e := _axolotl_dataset(d, i, kind, conv.unmapped)) is not None]
    data = put_sources(conv, sources, stage)
    for name, value in raw.items():
        if name in read or value is None:
            continue
        key = AXOLOTL_KEYS.get(name)
        if key is None:
            entry = NAMES.get(name)
            key = entry.key if entry and entry.key and "axolotl" in entry.source else None
        if key is None:
            conv.unmapped.append(f"{name}: {NOT_SETTINGS.get(name) or AXOLOTL_NOT.get(name, 'not a setting preftune knows')}")
            continue
        _put_converted(conv, name, value, key.replace(STAGE, stage), data if key.startswith("data.") else None)
    return conv


AXOLOTL_NOT = {
    "sample_packing": "preftune's batches are padded (dpo.layout: packed packs preference pairs)",
    "pad_to_sequence_len": "preftune pads each batch to its longest row", "dataset_prepared_path": "preftune caches "
    "tokenized data itself", "special_tokens": "preftune uses the tokenizer's special tokens",
    "tf32": "torch's matmul precision is left at its default", "deepspeed": "set by `accelerate launch` (preftune's "
    "launcher docs)", "fsdp": "set by `accelerate launch`", "fsdp_config": "set by `accelerate launch`",
    "strict": "preftune always rejects unknown keys", "load_in_8bit": "preftune quantizes to 4-bit only (QLoRA)",
    "evals_per_epoch": "preftune evaluates every eval_every steps", "saves_per_epoch": "preftune saves every save_every steps",
}


def _put_converted(conv: Conversion, name: str, value: Any, key: str, data: str | None) -> None:
    """Convert ``value`` with the name table's converter for ``name`` (if any) and put it at ``key``."""
    entry = NAMES.get(name)
    if name == "warmup_steps" and isinstance(value, (int, float)) and 0 <= value < 1:  # a fraction: the ratio
        put(conv.tree, key.replace("warmup_steps", "warmup_ratio"), float(value))
        return
    try:
        new = entry.convert(value) if entry and entry.convert else value
    except Unmappable as e:
        conv.unmapped.append(f"{name}: {e}")
        return
    except (TypeError, ValueError):
        conv.unmapped.append(f"{name}: {value!r} is not a valid value")
        return
    if new is not None:
        moved = data and key.startswith("data.") and key not in TOP_LEVEL_DATA
        put(conv.tree, data + key[len("data"):] if moved else key, new)


# ---------------------------------------------------------------- config from-llamafactory


LF_STAGES = {"sft": "sft", "dpo": "dpo", "kto": "kto"}
LF_LOSSES = {"sigmoid": "dpo", "hinge": "dpo", "ipo": "dpo", "orpo": "orpo", "simpo": "simpo"}
LF_KEYS = {
    "model_name_or_path": "model", "model_revision": "model_revision", "cutoff_len": "data.max_length",
    "max_samples": "data.max_rows", "val_size": "data.test_size", "preprocessing_num_workers": "data.num_proc",
    "lora_rank": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "trust_remote_code": "trust_remote_code",
}
"""LLaMA-Factory's own keys that carry over as they are; its training arguments are transformers' (NAMES)."""
LF_NOT = {"template": "LLaMA-Factory's prompt template; preftune renders with the tokenizer's chat template (or "
                      "data.chat_template)",
          "plot_loss": "preftune writes metrics.jsonl (and `preftune report` plots it)", "ddp_timeout": "set by the launcher",
          "overwrite_cache": "preftune's tokenized cache is keyed by the data and tokenizer"}
FLASH_ATTN = {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager", "auto": None}


def _lf_entry(name: str, info: dict, folder: Path, kind: str, unmapped: list[str]) -> dict | None:
    """One ``dataset_info.json`` entry -> a ``data.mixture`` entry: its file or Hub id, format, columns, roles."""
    d = info.get(name)
    if d is None:
        unmapped.append(f"dataset: {name!r} is not in {folder / 'dataset_info.json'}; left out")
        return None
    src = str(folder / d["file_name"]) if d.get("file_name") else d.get("hf_hub_url")
    if not src:
        unmapped.append(f"dataset {name!r}: neither file_name nor hf_hub_url (ms_hub_url/script_url are not read); left out")
        return None
    entry: dict = {"source": src} | ({"subset": d["subset"]} if d.get("subset") else {}) | (
        {"split": d["split"]} if d.get("split") else {})
    cols, tags = dict(d.get("columns") or {}), dict(d.get("tags") or {})
    if d.get("formatting", "alpaca") == "sharegpt":
        columns = {"conversations": cols.get("messages", "conversations")} | {
            k: cols[k] for k in ("chosen", "rejected", "system") if k in cols}
        roles = {"role_key": tags.get("role_tag", "from"), "content_key": tags.get("content_tag", "value"),
                 "user": tags.get("user_tag", "human"), "assistant": tags.get("assistant_tag", "gpt")}
        roles |= {"system": tags["system_tag"]} if "system_tag" in tags else {}
        if kind == "kto":
            unmapped.append(f"dataset {name!r}: KTO rows in ShareGPT layout; preftune's kto format reads prompt, "
                            "completion and label columns")
        renamed = {k: v for k, v in columns.items() if k != v}
        return entry | {"format": "sharegpt", "roles": roles} | ({"columns": renamed} if renamed else {})
    if cols.get("query"):
        unmapped.append(f"dataset {name!r}: LLaMA-Factory appends the {cols['query']!r} column to the instruction; "
                        "preftune reads the instruction column as the prompt")
    if kind == "sft":
        columns = {"instruction": cols.get("prompt", "instruction"), "input": cols.get("query", "input"),
                   "output": cols.get("response", "output")} | ({"system": cols["system"]} if "system" in cols else {})
        return entry | {"format": "alpaca", "columns": {k: v for k, v in columns.items() if k != v}}
    if kind == "kto":
        columns = {"prompt": cols.get("prompt", "instruction"), "completion": cols.get("response", "output"),
                   "label": cols.get("kto_tag", "kto_tag")}
        return entry | {"format": "kto", "columns": {k: v for k, v in columns.items() if k != v}}
    columns = {"prompt": cols.get("prompt", "instruction"), "chosen": cols.get("chosen", "chosen"),
               "rejected": cols.get("rejected", "rejected")} | ({"system": cols["system"]} if "system" in cols else {})
    return entry | {"format": "standard", "columns": {k: v for k, v in columns.items() if k != v}}


def _lf_special(raw: dict, conv: Conversion) -> None:
    """LoRA/QLoRA, attention and precision in LLaMA-Factory's terms."""
    t = conv.tree
    lora = raw.get("finetuning_type", "lora") == "lora"
    put(t, "lora.enabled", lora)
    if raw.get("finetuning_type") == "freeze":
        conv.unmapped.append("finetuning_type: freeze (train some layers) is not in preftune; trains all weights")
    if lora:
        put(t, "lora.r", int(raw.get("lora_rank", 8)))
        put(t, "lora.alpha", int(raw.get("lora_alpha") or 2 * int(raw.get("lora_rank", 8))))
        put(t, "lora.dropout", float(raw.get("lora_dropout", 0.0)))
        target = raw.get("lora_target", "all")
        put(t, "lora.target_modules", ["all-linear"] if target == "all" else [m.strip() for m in str(target).split(",")])
    if raw.get("quantization_bit") is not None:
        if int(raw["quantization_bit"]) == 4:
            put(t, "lora.quantize_4bit", True)
        else:
            conv.unmapped.append(f"quantization_bit: {raw['quantization_bit']}; preftune quantizes to 4-bit only (QLoRA)")
    if FLASH_ATTN.get(raw.get("flash_attn")):
        put(t, "attn_implementation", FLASH_ATTN[raw["flash_attn"]])
    if raw.get("bf16"):
        put(t, "precision", "bf16-mixed")
    if raw.get("pure_bf16"):
        put(t, "precision", "bf16")
    if raw.get("fp16"):
        conv.unmapped.append("fp16: preftune has no fp16; use precision bf16-mixed")


LF_DEFAULTS = TRAINING_ARGUMENTS | {"learning_rate": 5e-5, "logging_steps": 500, "cutoff_len": 2048,
                                    "pref_beta": 0.1, "pref_loss": "sigmoid", "pref_ftx": 0.0, "simpo_gamma": 0.5,
                                    "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0, "dataset_dir": "data"}
"""LLaMA-Factory's defaults (its training arguments are transformers', which it does not change)."""
LF_READ = frozenset({"stage", "pref_beta", "pref_loss", "pref_ftx", "simpo_gamma", "dpo_label_smoothing",
                     "kto_chosen_weight", "kto_rejected_weight", "dataset", "eval_dataset", "pure_bf16", "bf16", "fp16",
                     "lora_rank", "lora_alpha", "lora_dropout", "finetuning_type", "lora_target", "quantization_bit",
                     "flash_attn", "dataset_dir"})


def _lf_loss(raw: dict, kind: str, unmapped: list[str]) -> Any:
    loss_raw = {"loss_type": "simpo" if kind == "simpo" else raw["pref_loss"], "beta": float(raw["pref_beta"]),
                "cpo_alpha": float(raw["pref_ftx"]), "simpo_gamma": float(raw["simpo_gamma"]),
                "desirable_weight": float(raw["kto_chosen_weight"]), "undesirable_weight": float(raw["kto_rejected_weight"])}
    if kind == "dpo" and raw.get("pref_ftx"):
        loss_raw["rpo_alpha"] = float(raw["pref_ftx"])
    if kind == "orpo" and raw.get("pref_ftx"):
        unmapped.append("pref_ftx: ORPO's NLL term is part of its loss; the extra weight is left out")
    loss = trl_loss(loss_raw, kind, unmapped)
    if raw.get("dpo_label_smoothing") and kind == "dpo":
        loss = {"name": loss, "label_smoothing": float(raw["dpo_label_smoothing"])} if isinstance(loss, str) else loss
    return loss


def convert_llamafactory(raw: dict, dataset_info: Path | None, recipe_dir: Path) -> Conversion:
    """A LLaMA-Factory config -> a Conversion: ``stage`` (sft, dpo, kto) and ``pref_loss`` (sigmoid, hinge,
    ipo, orpo, simpo) pick the loss, and each name in ``dataset`` is looked up in ``dataset_info.json``
    (``dataset_info``, else ``dataset_dir`` beside the recipe) for its file, format and columns."""
    stage_name = raw.get("stage", "sft")
    if stage_name not in LF_STAGES:
        raise PreftuneError(f"config from-llamafactory: stage: {stage_name!r}; preftune trains sft, dpo and kto "
                            "(pref_loss orpo and simpo are dpo stages)")
    raw = LF_DEFAULTS | raw
    kind = LF_STAGES[stage_name]
    if kind == "dpo":
        if raw["pref_loss"] not in LF_LOSSES:
            raise PreftuneError(f"config from-llamafactory: pref_loss: {raw['pref_loss']!r}; preftune maps "
                                f"{', '.join(LF_LOSSES)}")
        kind = LF_LOSSES[raw["pref_loss"]]
    stage = "sft" if kind == "sft" else "dpo"
    conv = Conversion({"sft": {"enabled": kind == "sft"}, "dpo": {"enabled": kind != "sft"}}, kind)
    if stage == "dpo":
        put(conv.tree, "dpo.loss", _lf_loss(raw, kind, conv.unmapped))
        if kind != "orpo":
            put(conv.tree, "dpo.beta", float(raw["pref_beta"]))
    _lf_special(raw, conv)
    folder = Path(dataset_info).parent if dataset_info else recipe_dir / str(raw["dataset_dir"])
    info_file = Path(dataset_info) if dataset_info else folder / "dataset_info.json"
    names = [n.strip() for n in str(raw.get("dataset") or "").split(",") if n.strip()]
    if names and not info_file.is_file():
        raise PreftuneError(f"config from-llamafactory: {info_file} not found; LLaMA-Factory's dataset names are "
                            "declared there. Pass --dataset-info PATH/dataset_info.json")
    info = json.loads(info_file.read_text()) if names else {}
    sources = [e for n in names if (e := _lf_entry(n, info, folder, kind, conv.unmapped)) is not None]
    data = put_sources(conv, sources, stage)
    if "val_size" in raw:
        put(conv.tree, f"{data}.test_split", None)  # LLaMA-Factory carves val_size off the training rows
    if raw.get("eval_dataset"):
        conv.unmapped.append("eval_dataset: held-out rows come from data.test_split or data.test_source (one file)")
    for name, value in raw.items():
        if name in LF_READ or value is None:
            continue
        key = LF_KEYS.get(name) or (NAMES[name].key if name in NAMES and NAMES[name].key else None)
        if key is None or name in LF_NOT:
            conv.unmapped.append(f"{name}: {LF_NOT.get(name) or NOT_SETTINGS.get(name, 'not a setting preftune knows')}")
            continue
        _put_converted(conv, name, value, key.replace(STAGE, stage), data if key.startswith("data.") else None)
    return conv
