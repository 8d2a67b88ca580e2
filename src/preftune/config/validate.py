"""Checking a config beyond its types: each field's range rule, the cross-field rules, and the values
that name a plug-in (losses, data formats, column mappings) checked against its table. THE entry
points ``load_config`` and ``config_from_dict`` build and check a config, listing every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

from preftune.config.load import apply_overrides, build, load_raw, to_dict
from preftune.config.rules import UNIT_INTERVAL
from preftune.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    DPOConfig,
    EvalConfig,
    EvalDatasetConfig,
    GenerationConfig,
    LoraConfig,
    MixtureSource,
    RMConfig,
    RoundsConfig,
    WinrateConfig,
    range_rule,
)
from preftune.data.formats import FORMATS, PREFERENCE_FORMATS
from preftune.data.mapping import mapping_problems
from preftune.eval.judges import JUDGES
from preftune.loss_terms import LEGACY_LOSS_KEYS, loss_problems, resolve_loss


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build and check a config from a raw mapping; raise ConfigError listing every problem."""
    cfg, problems = build(raw)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    if cfg.precision == "auto":
        from preftune.model import auto_precision  # torch: only when asked

        cfg = dataclasses.replace(cfg, precision=auto_precision())
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply dotted ``key=value`` overrides; raise ConfigError listing every problem."""
    return config_from_dict(apply_overrides(load_raw(path), overrides), str(path) if path else "config")


def validate(cfg: Config) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    p: list[str] = []
    p += _range_problems(cfg, "")
    p += _model_problems(cfg.model)
    p += _recipe_problems(cfg)
    d = cfg.dpo
    if isinstance(d, DPOConfig):
        p += loss_problems(d, cfg.data)
        if d.reference == "adapter" and isinstance(cfg.lora, LoraConfig) and not cfg.lora.enabled:
            p.append("dpo.reference: 'adapter' needs lora.enabled=true (the reference is the policy without adapters)")
    for name, dc in (("data", cfg.data), ("sft.data", getattr(cfg.sft, "data", None))):
        if isinstance(dc, DataConfig) and isinstance(dc.max_length, int) and isinstance(dc.max_prompt_length, int):
            if dc.max_prompt_length >= dc.max_length:
                p.append(f"{name}.max_prompt_length ({dc.max_prompt_length}) must be below {name}.max_length ({dc.max_length})")
        if isinstance(dc, DataConfig):
            p += _data_problems(dc, name)
    ev = cfg.eval
    if isinstance(ev, EvalConfig) and isinstance(ev.curve_every, int) and ev.curve_every > 0:
        if not (isinstance(ev.winrate, WinrateConfig) and ev.winrate.enabled) and not ev.tasks:
            p.append("eval.curve_every: curves evaluate win-rate and downstream tasks, but eval.winrate.enabled "
                     "is false and eval.tasks is empty")
    if isinstance(ev, EvalConfig) and isinstance(ev.datasets, list):
        p += _validate_eval_datasets(ev.datasets)
    if isinstance(ev, EvalConfig) and isinstance(ev.winrate, WinrateConfig) and isinstance(ev.winrate.judge, str):
        p += _not_one_of("eval.winrate.judge", ev.winrate.judge, list(JUDGES))
    r = cfg.rounds
    if isinstance(r, RoundsConfig):
        if r.loss is not None and isinstance(d, DPOConfig):
            p += [m.replace("dpo.loss", "rounds.loss") for m in loss_problems(r.stage_dpo(d), cfg.data)]
        if r.reference == "sft" and isinstance(cfg.lora, LoraConfig) and not cfg.lora.enabled:
            p.append("rounds.reference: 'sft' needs lora.enabled=true (the reference is the policy with its adapters "
                     "off); use 'round_start' with full fine-tuning")
    p += _reward_model_problems(cfg)
    g = cfg.generation
    if isinstance(g, GenerationConfig) and g.engine == "openai" and not g.base_url:
        p.append("generation.base_url: engine 'openai' needs the server's URL, e.g. http://127.0.0.1:8000/v1")
    if isinstance(cfg.lora, LoraConfig) and cfg.lora.quantize_4bit and not cfg.lora.enabled:
        p.append("lora.quantize_4bit: QLoRA needs lora.enabled=true")
    for t in cfg.report_to if isinstance(cfg.report_to, list) else []:
        if t not in ("tensorboard", "wandb", "mlflow"):
            close = difflib.get_close_matches(str(t), ["tensorboard", "wandb", "mlflow"], n=1)
            p.append(f"report_to: unknown tracker {t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return p


def _reward_model_problems(cfg: Config) -> list[str]:
    """A reward model asked for (rounds' reward, the win-rate judge) needs a path, or the pipeline's own
    ``rm`` stage (``rm.enabled``), which fills the path in."""
    own = isinstance(cfg.rm, RMConfig) and cfg.rm.enabled
    r, ev = cfg.rounds, cfg.eval
    p = []
    if isinstance(r, RoundsConfig) and r.reward == "reward_model" and not r.reward_model and not own:
        p.append("rounds.reward_model: reward 'reward_model' needs the path of a sequence-classification model "
                 "(a `preftune rm` run), or rm.enabled=true in the pipeline to train one first")
    w = ev.winrate if isinstance(ev, EvalConfig) else None
    if isinstance(w, WinrateConfig) and w.enabled and w.judge == "reward_model" and not w.judge_model and not own:
        p.append("eval.winrate.judge_model: judge 'reward_model' needs the path of a reward model (a `preftune rm` "
                 "run), or rm.enabled=true in the pipeline to train one first")
    return p


def _not_one_of(key: str, value: str, choices: list[str]) -> list[str]:
    """A plug-in name that no registry entry has, said as the type checker says a wrong Literal."""
    if value in choices:
        return []
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return [f"{key}: {value!r} is not one of {' | '.join(map(repr, choices))}{hint}"]


def _data_problems(dc: DataConfig, name: str) -> list[str]:
    p = []
    if isinstance(dc.max_drop_fraction, float) and not 0 <= dc.max_drop_fraction <= 1:
        p.append(f"{name}.max_drop_fraction: must be in [0, 1], got {dc.max_drop_fraction}")
    if isinstance(dc.columns, dict) and isinstance(dc.roles, dict):
        p += mapping_problems(dc.columns, dc.roles, name)
    for i, m in enumerate(dc.mixture if isinstance(dc.mixture, list) else []):
        key = f"{name}.mixture[{i}]"
        if not isinstance(m, MixtureSource):
            continue
        if not m.source:
            p.append(f"{key}.source: required (a local file or folder, embedded:NAME, or a Hub dataset)")
        if isinstance(m.fraction, (int, float)) and (why := UNIT_INTERVAL(m.fraction)):
            p.append(f"{key}.fraction: {why}, got {m.fraction!r}")
        if m.format is not None and m.format != "auto" and m.format not in FORMATS:
            close = difflib.get_close_matches(str(m.format), list(FORMATS), n=1)
            p.append(f"{key}.format: unknown format {m.format!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if isinstance(m.columns, dict) and isinstance(m.roles, dict):
            p += mapping_problems(m.columns, m.roles, key)
    if dc.mixture and dc.test_source:
        p.append(f"{name}.test_source: with {name}.mixture the held-out rows are each source's test_split (or "
                 "test_size carved off); remove one")
    return p


HF_SCHEDULE_NEEDS = {"cosine_with_min_lr": ("min_lr", "min_lr_rate"), "warmup_stable_decay": ("num_decay_steps",)}
"""transformers' schedules that need an argument in ``schedule_kwargs`` (any one of these)."""


def _recipe_problems(cfg: Config) -> list[str]:
    """The settings recipes from other tools bring: the pinned revision, the chat template, the schedules."""
    p = []
    if cfg.model_revision and isinstance(cfg.model, str) and (
            cfg.model.startswith(("embedded:", "tiny")) or Path(cfg.model).expanduser().exists()):
        p.append(f"model_revision: {cfg.model_revision!r} pins a Hub model's revision, but model {cfg.model!r} is "
                 "local; remove model_revision or name the Hub model")
    if isinstance(cfg.sft.data, DataConfig) and cfg.sft.data.chat_template:
        p.append("sft.data.chat_template: one template serves every stage (the tokenizer's); set data.chat_template")
    for stage in ("sft", "dpo"):
        s = getattr(cfg, stage)
        if not isinstance(s.schedule_kwargs, dict):
            continue
        needs = HF_SCHEDULE_NEEDS.get(s.schedule, ())
        if needs and not s.schedule_kwargs.keys() & set(needs):
            p.append(f"{stage}.schedule_kwargs: schedule {s.schedule!r} needs {' or '.join(needs)} (transformers' "
                     f"lr_scheduler_kwargs), e.g. {stage}.schedule_kwargs={{{needs[0]}: 0.1}}")
        if s.schedule_kwargs and s.schedule in ("cosine", "linear", "constant"):
            p.append(f"{stage}.schedule_kwargs: preftune's {s.schedule!r} takes no arguments; they are for "
                     "transformers' schedules (inverse_sqrt, cosine_with_min_lr, ...)")
    return p



def _range_problems(node: Any, prefix: str) -> list[str]:
    """Every number outside its field's range rule, walking the nested configs."""
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += _range_problems(value, f"{prefix}{f.name}.")
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue  # null, "auto", or a type problem already reported
        if (rule := range_rule(f)) is not None and (why := rule(value)):
            out.append(f"{prefix}{f.name}: {why}, got {value!r}")
    return out


def _model_problems(model: Any) -> list[str]:
    """``model`` names that cannot work, found before anything loads."""
    if not isinstance(model, str):
        return []
    if model.startswith("tiny:") and model[5:] and not model[5:].isdigit():
        return [f"model: {model!r} is not a tiny model; the seed after 'tiny:' is a number (tiny:0, tiny:1)"]
    if Path(model).expanduser().is_file():
        return [f"model: {model} is a file; pass the folder that holds the model's config.json"]
    if _is_btlm(model):
        return [f"model: {model} (BTLM) is refused: its own code (trust_remote_code) multiplies the output logits "
                "by a muP scale inside its forward, which the chunked log-prob path (hidden states x lm_head) "
                "skips, and its ALiBi attention is unchecked against the prefix-shared layouts, so log-probs "
                "would be silently wrong; the study's recipes (configs/study/) use EleutherAI/pythia-2.8b"]
    return []


def _is_btlm(model: str) -> bool:
    """A BTLM model: by Hub name, or a local folder whose config.json says ``model_type: btlm``."""
    if "btlm" in model.lower().rsplit("/", 1)[-1]:
        return True
    config = Path(model).expanduser() / "config.json"
    return config.is_file() and '"btlm"' in config.read_text(encoding="utf-8", errors="replace")


DATASET_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _validate_eval_datasets(datasets: list) -> list[str]:
    """Each ``eval.datasets[i]`` needs a source, a unique file-safe name and a preference format."""
    p: list[str] = []
    seen: dict[str, int] = {}
    for i, d in enumerate(datasets):
        if not isinstance(d, EvalDatasetConfig):
            continue
        key = f"eval.datasets[{i}]"
        if not d.name:
            p.append(f"{key}.name: required (a label for eval.json and the report, e.g. 'hh')")
        elif not DATASET_NAME.fullmatch(str(d.name)):
            p.append(f"{key}.name: {d.name!r} may hold only letters, digits, '.', '_' and '-'")
        elif d.name in seen:
            p.append(f"{key}.name: {d.name!r} is already the name of eval.datasets[{seen[d.name]}]")
        else:
            seen[d.name] = i
        if not d.source:
            p.append(f"{key}.source: required (a local file or folder, embedded:NAME, or a Hub dataset)")
        if d.format != "auto" and d.format not in PREFERENCE_FORMATS:
            close = difflib.get_close_matches(str(d.format), PREFERENCE_FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.append(f"{key}.format: {d.format!r} is not a preference format; choose auto or one of "
                     f"{', '.join(PREFERENCE_FORMATS)}{hint}")
        if isinstance(d.max_length, int) and isinstance(d.max_prompt_length, int) and d.max_prompt_length >= d.max_length:
            p.append(f"{key}.max_prompt_length ({d.max_prompt_length}) must be below {key}.max_length ({d.max_length})")
        if isinstance(d.max_eval_rows, int) and d.max_eval_rows < 1:
            p.append(f"{key}.max_eval_rows: must be at least 1 (or null for all), got {d.max_eval_rows}")
    return p


def resolved_dict(cfg: Config) -> dict:
    """``to_dict`` with ``dpo.loss`` resolved to its terms and every parameter (the older flat loss keys
    folded in and cleared): what ``preftune config show`` prints, and a config that loads as it is."""
    out = to_dict(cfg)
    terms, problems = resolve_loss(cfg.dpo)
    if terms and not problems:
        resolved = [t.to_dict() for t in terms]
        if len(resolved) == 1 and resolved[0]["weight"] == 1.0:
            del resolved[0]["weight"]
        out["dpo"]["loss"] = resolved[0] if len(resolved) == 1 else resolved
        out["dpo"]["loss_weights"] = None
        for legacy in (*LEGACY_LOSS_KEYS, "sft_weight"):
            out["dpo"][legacy] = None
    return out
