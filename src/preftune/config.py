"""Typed run configuration: dataclasses with a docstring per field, loaded from YAML plus dotted
``key=value`` overrides. Every problem is collected and reported at once; an unknown key is an error
with a did-you-mean. Nothing here touches models or data."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from preftune.errors import PreftuneError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(PreftuneError):
    """One or more problems in a config; ``problems`` lists them all."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters (peft) instead of all weights."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt; ``all-linear`` means every linear layer but the LM head."""
    quantize_4bit: bool = False
    """QLoRA: load the base in bitsandbytes 4-bit NF4 (CUDA only)."""


@dataclass
class DataConfig:
    source: str = "embedded:prefs"
    """Where the rows come from: ``embedded:prefs``, a local .jsonl/.json/.parquet/.csv file or folder,
    or a Hub dataset name (online only)."""
    format: str = "auto"
    """Row format: auto, hh, shp, chat, standard, implicit (preference) or alpaca, messages, completion (SFT)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on."""
    test_split: str | None = "test"
    """Held-out split, when the source has one; otherwise ``test_size`` is carved off reproducibly."""
    test_size: float = 0.1
    """Fraction carved off as the held-out split when the source has none."""
    max_rows: int | None = None
    """Use at most this many training rows (after shuffling with the seed)."""
    max_eval_rows: int | None = None
    """Use at most this many held-out rows."""
    on_error: Literal["stop", "skip"] = "stop"
    """A malformed row stops the run (``stop``, naming file, row and field) or is counted and skipped."""
    min_score_ratio: float = 2.0
    """SHP only: keep a pair when score(chosen) / score(rejected) is at least this."""
    max_length: int = 512
    """Token budget for prompt + one completion."""
    max_prompt_length: int = 256
    """The prompt keeps its last this-many tokens."""
    test_source: str | None = None
    """Held-out rows from another source (a file or folder, all of it held out) instead of a split of
    ``source``; on-policy rounds use it to train on their own pairs and evaluate on the run's held-out rows."""


@dataclass
class EvalDatasetConfig(DataConfig):
    """An extra evaluation dataset (``eval.datasets``): a name plus every field of a DataConfig, so
    each source keeps its own format, split and truncation. Its held-out rows are chosen by the rules
    ``data`` follows (its split, or ``test_size`` carved off with the seed), so with the same source and
    split settings a model is never evaluated on rows it was trained on."""

    source: str = ""
    """Where the rows come from (required): a local file or folder, ``embedded:NAME`` or a Hub dataset."""
    name: str = ""
    """Label in ``eval.json`` (``datasets.<name>``) and the report; letters, digits, ``._-``; unique."""


@dataclass
class TrainConfig:
    """Loop settings shared by every stage."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    epochs: float = 1.0
    """Passes over the training data; ignored when ``max_steps`` is set."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides ``epochs``."""
    batch_size: int = 4
    """Rows (pairs for preference methods) per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_batch_size: int = 8
    """Rows per evaluation batch."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only the final model)."""
    save_total_limit: int = 2
    """Keep at most this many step checkpoints (``best/`` and ``final/`` are kept apart)."""
    nan_tolerance: int = 5
    """Abort after this many consecutive steps with a NaN/inf loss (each one is skipped with a warning)."""
    early_stopping: bool = False
    """Stop when the eval metric stops improving and keep ``best/``."""
    early_stopping_metric: str = "eval/rewards/accuracies"
    """Metric that early stopping and ``best/`` follow."""
    early_stopping_mode: Literal["max", "min"] = "max"
    """Whether a larger metric is better."""
    patience: int = 3
    """Eval rounds without improvement before stopping."""
    min_delta: float | Literal["auto"] = "auto"
    """Improvement that counts; ``auto`` is one standard error of the eval accuracy."""
    chunked_logps: bool = True
    """Compute log-probs from hidden states in vocabulary chunks so [B, T, V] logits never exist."""


@dataclass
class SFTConfig(TrainConfig):
    enabled: bool = True
    """Run this stage in ``preftune pipeline``."""
    completion_only: bool = True
    """Mask the prompt out of the loss."""
    early_stopping_metric: str = "eval/loss"
    """Metric that early stopping and ``best/`` follow."""
    early_stopping_mode: Literal["max", "min"] = "min"
    """Whether a larger metric is better."""
    data: DataConfig | None = None
    """SFT data; null means the chosen responses of ``data`` (SFT on the preferred subset)."""


@dataclass
class DPOConfig(TrainConfig):
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    enabled: bool = True
    """Run this stage in ``preftune pipeline``."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
    """Preference loss; simpo and orpo need no reference model."""
    beta: float = 0.1
    """Strength of the KL penalty (DPO family) or reward scale (SimPO)."""
    label_smoothing: float = 0.0
    """cDPO / robust DPO: assumed probability that a preference label is flipped."""
    ipo_normalize: Literal["mean", "sum"] = "mean"
    """IPO on per-token mean log-probs (as TRL) or on summed log-probs (as the IPO paper)."""
    gamma: float = 0.5
    """SimPO target reward margin, as gamma/beta ratio x beta (TRL's ``simpo_gamma``)."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term added to the chosen NLL."""
    sft_weight: float = 0.0
    """RPO-style weight of a chosen-NLL term added to the preference loss."""
    reference: Literal["auto", "copy", "adapter", "precomputed", "none"] = "auto"
    """Reference model strategy; ``auto`` picks precomputed (cached) log-probs, or none for simpo/orpo."""
    layout: Literal["auto", "padded", "prefix_shared", "packed"] = "auto"
    """Batch layout; ``auto`` picks prefix sharing where the model supports it. ``packed`` puts several
    prefix-shared pairs in one padding-free row, up to ``token_budget`` tokens per micro-batch."""
    token_budget: int = 2048
    """``packed`` layout: prompt + chosen + rejected tokens per micro-batch (replaces ``batch_size``)."""


@dataclass
class WinrateConfig:
    enabled: bool = True
    """Judge generations against the dataset's chosen responses."""
    judge: Literal["rule", "openai", "hf"] = "rule"
    """Judge backend."""
    judge_model: str | None = None
    """Model name for the openai judge, or path for the hf judge."""
    base_url: str | None = None
    """OpenAI-compatible endpoint (openai judge)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key (never logged)."""
    prompt: Literal["dialogue", "summarization"] = "dialogue"
    """Judge prompt template."""
    judge_template: str | None = None
    """A custom judge prompt instead of ``prompt``: text with ``{prompt}``, ``{response_a}`` and
    ``{response_b}``, or a path to a file holding it; the judge must end with ``Preferred: A|B|tie``."""
    per_category: int = 256
    """Prompts per category, as in the study."""
    max_new_tokens: int = 128
    """Generation length cap."""
    temperature: float = 0.0
    """Sampling temperature for generation (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_calls: int | None = None
    """Cap on judge calls (cost)."""
    concurrency: int = 4
    """Concurrent judge calls."""
    requests_per_second: float = 10.0
    """Judge rate limit."""


@dataclass
class HeldoutConfig:
    enabled: bool = True
    """Measure held-out LM loss (forgetting)."""
    corpus: str = "embedded:lee"
    """Plain-text corpus: ``embedded:lee`` or a local .txt/.jsonl file."""
    chunk_length: int = 256
    """Tokens per scored chunk."""
    max_chunks: int | None = 64
    """Score at most this many chunks."""


@dataclass
class EvalConfig:
    rewards: bool = True
    """Held-out reward accuracy against the reference."""
    winrate: WinrateConfig = field(default_factory=WinrateConfig)
    """Judged win-rate against the dataset's chosen responses."""
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    """Forgetting: held-out LM loss."""
    kl: bool = True
    """Drift: per-token KL of each model from its reference on the held-out chosen completions."""
    tasks: list[str] = field(default_factory=lambda: ["embedded:mc"])
    """Downstream tasks (lm-eval names or local task YAMLs); empty disables."""
    tasks_limit: int | None = None
    """Examples per downstream task."""
    batch_size: int = 8
    """Batch size for generation and scoring."""
    curve_every: int = 0
    """Snapshot the preference stage every N optimizer steps and evaluate every snapshot (win-rate,
    checked accuracy, downstream tasks) for the report's curves against tokens seen; 0 = off."""
    datasets: list[EvalDatasetConfig] = field(default_factory=list)
    """Extra preference datasets every model is also evaluated on (the study's Tables 5 and 6): win-rate
    against their chosen responses, reward accuracy and checked accuracy on each one's held-out rows."""


@dataclass
class RoundsConfig:
    """On-policy preference rounds (semi-online DPO): sample from the current policy, score the samples,
    train on the best against the worst, repeat."""

    n: int = 0
    """Rounds to run (``preftune iterate``, and ``preftune pipeline`` after the offline DPO stage); 0 = off."""
    prompts: int = 64
    """Training prompts drawn per round (seeded; never a held-out prompt)."""
    samples: int = 4
    """Completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 64
    """Length cap of each sample."""
    reward: Literal["rule", "judge", "reward_model"] = "rule"
    """How samples are scored: ``rule`` (the row's checkable answer), ``judge`` (the ``eval.winrate``
    judge against the row's chosen response, both orders) or ``reward_model`` (a local classifier)."""
    reward_model: str | None = None
    """``reward: reward_model``: a local AutoModelForSequenceClassification folder."""
    mix_offline: int = 0
    """Offline training pairs mixed into each round's pairs."""
    reference: Literal["round_start", "sft"] = "round_start"
    """Each round's reference: the policy the round starts from, or the SFT model (LoRA: the round
    keeps training the previous round's adapter, whose disabled state is the SFT model)."""
    epochs: float = 1.0
    """Passes over a round's pairs (the round's stage otherwise takes its settings from ``dpo``)."""
    lr: float | None = None
    """Learning rate of the rounds' stages; null = ``dpo.lr``."""


@dataclass
class Config:
    model: str = EMBEDDED_MODEL
    """``embedded:smollm2-135m-instruct``, ``tiny:`` (random 2-layer Llama for tests), a local path, or a Hub name (online)."""
    tokenizer: str | None = None
    """Tokenizer path when it differs from the model's."""
    precision: Literal["fp32", "bf16", "bf16-mixed"] = "fp32"
    """fp32; bf16 = pure bf16 weights; bf16-mixed = fp32 weights with bf16 autocast."""
    attn_implementation: str | None = None
    """transformers attention backend (sdpa, eager, flex_attention, flash_attention_2); null = model
    default. flex_attention takes the prefix-shared layouts as a BlockMask (training on CUDA only);
    flash_attention_2 takes only the padded layout."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    output_dir: str = "runs/default"
    """Run folder."""
    threads: int | None = None
    """torch CPU threads (null = torch default)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data (and SFT data unless ``sft.data`` is set)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning stage."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Preference stage (DPO family, SimPO, ORPO)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation suite."""
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    """On-policy preference rounds after the preference stage."""
    report_to: list[str] = field(default_factory=list)
    """Trackers: tensorboard, wandb, mlflow (the ``track`` extra)."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """Sweep axes (``preftune sweep``): dotted key -> list of values, or ``variants: [...]``."""


# ---------------------------------------------------------------- loading and validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return ``value`` converted to ``tp`` or append a problem naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return tp()
        return _build(tp, value, key + ".", problems)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        sub: list[str] = []
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _check(value, a, key, trial)
            if not trial:
                return out
            sub.extend(trial)
        problems.append(sub[0] if len(sub) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{key}: {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_check(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{key}: expected a number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{prefix}{k}'{hint}")
            continue
        kwargs[k] = _check(v, hints[k], prefix + k, problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        problems.append(f"{prefix or 'config'}: {e}")
        return cls()


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {} if nxt is None or nxt is True or nxt is False else nxt
            if not isinstance(nxt, dict):
                nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["dpo.beta=0.3", "lora.enabled=false"]`` -> ``[("dpo.beta", 0.3), ...]`` (values parsed as YAML)."""
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError([f"override {o!r} is not of the form key=value"], "command line")
        k, v = o.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
    return out


def apply_shorthands(raw: dict) -> dict:
    """Scalar shorthands: ``lora: false`` -> ``lora.enabled``, ``data: FILE`` -> ``data.source``."""
    if isinstance(raw.get("lora"), bool):
        raw["lora"] = {"enabled": raw["lora"]}
    if isinstance(raw.get("data"), str):
        raw["data"] = {"source": raw["data"]}
    return raw


def config_from_dict(raw: dict, source: str = "config") -> Config:
    problems: list[str] = []
    cfg = _build(Config, apply_shorthands(dict(raw)), "", problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_raw(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"], str(p))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of keys"], str(p))
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply dotted ``key=value`` overrides; raise ConfigError listing every problem."""
    raw = apply_shorthands(load_raw(path))
    for k, v in parse_overrides(list(overrides)):
        _set_dotted(raw, k, v)
    return config_from_dict(raw, str(path) if path else "config")


def validate(cfg: Config) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    p: list[str] = []
    for name in ("sft", "dpo"):
        s: TrainConfig = getattr(cfg, name)
        if not isinstance(s, TrainConfig):
            continue
        if isinstance(s.batch_size, int) and s.batch_size < 1:
            p.append(f"{name}.batch_size: must be at least 1, got {s.batch_size}")
        if isinstance(s.grad_accum, int) and s.grad_accum < 1:
            p.append(f"{name}.grad_accum: must be at least 1, got {s.grad_accum}")
        if isinstance(s.lr, float) and s.lr <= 0:
            p.append(f"{name}.lr: must be positive, got {s.lr}")
        if isinstance(s.warmup_ratio, float) and not 0 <= s.warmup_ratio < 1:
            p.append(f"{name}.warmup_ratio: must be in [0, 1), got {s.warmup_ratio}")
    d = cfg.dpo
    if isinstance(d, DPOConfig):
        if isinstance(d.beta, float) and d.beta <= 0:
            p.append(f"dpo.beta: must be positive, got {d.beta}")
        if isinstance(d.label_smoothing, float) and not 0 <= d.label_smoothing < 0.5:
            p.append(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
        if d.loss in ("simpo", "orpo") and d.reference not in ("auto", "none"):
            p.append(f"dpo.reference: {d.loss} trains without a reference model; use 'none' or 'auto'")
        if d.reference == "adapter" and isinstance(cfg.lora, LoraConfig) and not cfg.lora.enabled:
            p.append("dpo.reference: 'adapter' needs lora.enabled=true (the reference is the policy without adapters)")
    for name, dc in (("data", cfg.data), ("sft.data", getattr(cfg.sft, "data", None))):
        if isinstance(dc, DataConfig) and isinstance(dc.max_length, int) and isinstance(dc.max_prompt_length, int):
            if dc.max_prompt_length >= dc.max_length:
                p.append(f"{name}.max_prompt_length ({dc.max_prompt_length}) must be below {name}.max_length ({dc.max_length})")
    ev = cfg.eval
    if isinstance(ev, EvalConfig) and isinstance(ev.curve_every, int) and ev.curve_every:
        if ev.curve_every < 0:
            p.append(f"eval.curve_every: must be 0 (off) or a positive number of steps, got {ev.curve_every}")
        elif not (isinstance(ev.winrate, WinrateConfig) and ev.winrate.enabled) and not ev.tasks:
            p.append("eval.curve_every: curves evaluate win-rate and downstream tasks, but eval.winrate.enabled "
                     "is false and eval.tasks is empty")
    if isinstance(ev, EvalConfig) and isinstance(ev.datasets, list):
        p += _validate_eval_datasets(ev.datasets)
    r = cfg.rounds
    if isinstance(r, RoundsConfig):
        for key in ("n", "mix_offline"):
            if isinstance(getattr(r, key), int) and getattr(r, key) < 0:
                p.append(f"rounds.{key}: must be 0 or more, got {getattr(r, key)}")
        for key in ("prompts", "max_new_tokens"):
            if isinstance(getattr(r, key), int) and getattr(r, key) < 1:
                p.append(f"rounds.{key}: must be at least 1, got {getattr(r, key)}")
        if isinstance(r.samples, int) and r.samples < 2:
            p.append(f"rounds.samples: a pair needs at least 2 samples per prompt, got {r.samples}")
        if isinstance(r.temperature, float) and r.temperature <= 0:
            p.append(f"rounds.temperature: on-policy pairs need sampling (a positive temperature), got {r.temperature}")
        if r.reward == "reward_model" and not r.reward_model:
            p.append("rounds.reward_model: reward 'reward_model' needs the path of a sequence-classification model")
        if r.reference == "sft" and isinstance(cfg.lora, LoraConfig) and not cfg.lora.enabled:
            p.append("rounds.reference: 'sft' needs lora.enabled=true (the reference is the policy with its adapters "
                     "off); use 'round_start' with full fine-tuning")
    if isinstance(cfg.lora, LoraConfig) and cfg.lora.quantize_4bit and not cfg.lora.enabled:
        p.append("lora.quantize_4bit: QLoRA needs lora.enabled=true")
    for t in cfg.report_to if isinstance(cfg.report_to, list) else []:
        if t not in ("tensorboard", "wandb", "mlflow"):
            close = difflib.get_close_matches(str(t), ["tensorboard", "wandb", "mlflow"], n=1)
            p.append(f"report_to: unknown tracker {t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return p


DATASET_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _validate_eval_datasets(datasets: list) -> list[str]:
    """Each ``eval.datasets[i]`` needs a source, a unique file-safe name and a preference format."""
    from preftune.data.formats import PREFERENCE_FORMATS

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


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
