"""Typed run configuration: dataclasses with a docstring per field, loaded from YAML plus dotted
``key=value`` overrides. Every problem is collected and reported at once; an unknown key is an error
with a did-you-mean. Nothing here touches models or data."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from preftune import trl_names
from preftune.data.formats import PREFERENCE_FORMATS
from preftune.data.mapping import mapping_problems
from preftune.embedded import SMOLLM2
from preftune.errors import PreftuneError
from preftune.losses import LOSSES, NoParams, param_key

EMBEDDED_MODEL = SMOLLM2


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
    """Row format: auto, hh, shp, chat, standard, implicit, openai, sharegpt (preference), alpaca,
    messages, completion, sharegpt (SFT) or kto (unpaired)."""
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
    """A structurally malformed row (bad JSON, missing field, wrong type) stops the run (``stop``,
    naming file, row and field) or is counted and skipped (``skip``). Data-quality problems (an empty
    completion, chosen == rejected, a prompt the two sides do not share) are always counted drops."""
    max_drop_fraction: float = 0.05
    """Stop with the drop reasons and counts when more than this fraction of the rows read is dropped
    as bad data or malformed (usually a wrong format or mapping). Filters the user asked for
    (``min_score_ratio``, ``max_rows``) do not count."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field name -> the dataset's column, applied before the format adapters, e.g.
    ``{prompt: question, chosen: response_j, rejected: response_k}``."""
    roles: dict[str, str] = field(default_factory=dict)
    """Message keys and role names of conversation lists, e.g. ``{role_key: from, content_key: value,
    user: human, assistant: gpt, system: system}`` (ShareGPT's are the ``sharegpt`` format's default)."""
    min_score_ratio: float = 2.0
    """SHP only: keep a pair when score(chosen) / score(rejected) is at least this; at most 1 (or a
    file without score columns) keeps every pair."""
    max_length: int = 512
    """Token budget for prompt + one completion."""
    max_prompt_length: int = 256
    """The prompt keeps its last this-many tokens."""
    test_source: str | None = None
    """Held-out rows from another source (a file or folder, all of it held out) instead of a split of
    ``source``; on-policy rounds use it to train on their own pairs and evaluate on the run's held-out rows."""
    num_proc: int | None = None
    """Processes that tokenize (null: the cores, at most 8; 1: this process only)."""


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
    drop_last: bool = False
    """Drop an epoch's last incomplete optimizer step (its rows are counted in the log) instead of
    taking it with fewer micro-batches, weighted by the rows it holds."""
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
    loss: str | dict[str, Any] | list[Any] = "sigmoid"
    """Preference loss: a name (``sigmoid``), a name with parameters (``{name: simpo, beta: 2.0, gamma:
    0.5}``) or a weighted list (``[{name: sigmoid}, {name: sft, weight: 0.5}]``); the names and their
    parameters are the table in losses.py (``preftune dpo --help``, the README's methods table)."""
    loss_weights: list[float] | None = None
    """TRL-style weights for a list of loss names, one per loss (instead of ``weight`` in each entry)."""
    beta: float = 0.1
    """Strength of the KL penalty (DPO family) or reward scale (SimPO, CPO, KTO), for every loss that
    takes a ``beta`` and does not set its own."""
    label_smoothing: float | None = None
    """Older form of the loss parameter ``label_smoothing``."""
    ipo_normalize: Literal["mean", "sum"] | None = None
    """Older form of ipo's ``normalize``."""
    gamma: float | None = None
    """Older form of the loss parameter ``gamma`` (SimPO's margin)."""
    orpo_lambda: float | None = None
    """Older form of orpo's ``lambda``."""
    sft_weight: float | None = None
    """Older form of an ``{name: sft, weight: w}`` entry: an RPO-style chosen-NLL term."""
    ld_alpha: float | None = None
    """LD-DPO (Liu et al. 2024): log-prob tokens beyond the shorter completion of a pair count ``ld_alpha``
    times, in policy and reference alike; in [0, 1], null is plain DPO."""
    wpo: bool = False
    """WPO (Zhou et al. 2024, eq. 2): weight each pair's loss by the policy's length-normalised probability
    of both completions (TRL's ``use_weighting``)."""
    sync_ref_model: bool = False
    """TR-DPO (Gorbatovski et al. 2024): every ``ref_model_sync_steps`` steps the reference becomes
    ``alpha * policy + (1 - alpha) * reference``; needs ``dpo.reference`` copy or adapter."""
    ref_model_sync_steps: int = 512
    """TR-DPO: optimizer steps between reference updates."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO: weight of the policy in the reference update (1 = a hard copy)."""
    unpair: bool = False
    """Unpaired losses (such as kto) on preference data: split each pair into a desirable
    (chosen) and an undesirable (rejected) row. Without it such losses need unpaired (``kto``) data."""
    reference: Literal["auto", "copy", "adapter", "precomputed", "none"] = "auto"
    """Reference model strategy; ``auto`` picks precomputed (cached) log-probs, or none for the losses
    that need no reference."""
    layout: Literal["auto", "padded", "prefix_shared", "packed"] = "auto"
    """Batch layout; ``auto`` picks prefix sharing where the model supports it. ``packed`` puts several
    prefix-shared pairs in one padding-free row, up to ``token_budget`` tokens per micro-batch."""
    token_budget: int = 2048
    """``packed`` layout: prompt + chosen + rejected tokens per micro-batch (replaces ``batch_size``)."""

    def terms(self) -> list[LossTerm]:
        """``dpo.loss`` resolved: one LossTerm per loss, parameters filled in; a ConfigError if invalid.
        Memoised on the loss fields (the DPO step asks for every batch)."""
        key = repr([getattr(self, f) for f in ("loss", "loss_weights", "beta", *LEGACY_LOSS_KEYS, "sft_weight")])
        if key not in _RESOLVED:
            terms, problems = resolve_loss(self)
            if problems:
                raise ConfigError(problems)
            _RESOLVED[key] = tuple(terms)
        return list(_RESOLVED[key])

    @property
    def loss_name(self) -> str:
        """The loss names joined by ``+`` (``sigmoid``, ``sigmoid+sft``): run.json's ``method``."""
        return "+".join(t.name for t in self.terms())

    @property
    def loss_beta(self) -> float:
        """The ``beta`` of the first loss that takes one (run.json, the model card), else ``dpo.beta``."""
        return next((t.params.beta for t in self.terms() if hasattr(t.params, "beta")), self.beta)

    def needs_reference(self) -> bool:
        """Whether any of the losses needs reference log-probs."""
        return any(LOSSES[t.name].needs_reference for t in self.terms())

    def unpaired(self) -> bool:
        """Whether the losses read unpaired rows (KTO)."""
        return any(LOSSES[t.name].unpaired for t in self.terms())


@dataclass(frozen=True)
class LossTerm:
    """One resolved entry of ``dpo.loss``: the loss name, its weight and its parameters (an instance of
    the loss's parameter dataclass in losses.py)."""

    name: str
    weight: float
    params: Any

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight} | {
            param_key(k): v for k, v in dataclasses.asdict(self.params).items()}


_RESOLVED: dict[str, tuple[LossTerm, ...]] = {}
"""``DPOConfig.terms`` memo: the repr of the loss fields -> the resolved terms."""

LEGACY_LOSS_KEYS = {"label_smoothing": "label_smoothing", "ipo_normalize": "normalize", "gamma": "gamma",
                    "orpo_lambda": "lambda"}
"""Flat ``dpo.*`` keys of older configs -> the loss parameter they now fill."""
LEGACY_DEFAULTS = {"label_smoothing": 0.0, "ipo_normalize": "mean", "gamma": 0.5, "orpo_lambda": 0.1}
"""Their old defaults: saved configs carry them for every loss, so a loss that lacks the parameter ignores them."""


def _loss_entries(d: DPOConfig, problems: list[str]) -> list[tuple[str, dict]]:
    """``dpo.loss`` (and ``dpo.loss_weights``) as ``(config key, {name, weight?, params...})`` entries."""
    spec = d.loss
    if isinstance(spec, (str, dict)):
        raw = [spec]
        keys = ["dpo.loss"]
    elif isinstance(spec, list) and spec:
        raw, keys = spec, [f"dpo.loss[{i}]" for i in range(len(spec))]
    else:
        problems.append(f"dpo.loss: expected a loss name, a mapping with a name, or a non-empty list, got {spec!r}")
        return []
    entries = []
    for key, e in zip(keys, raw):
        if isinstance(e, str):
            entries.append((key, {"name": e}))
        elif isinstance(e, dict):
            entries.append((key, dict(e)))
        else:
            problems.append(f"{key}: expected a loss name or a mapping such as {{name: sigmoid}}, got {e!r}")
    if d.loss_weights is not None:
        if len(d.loss_weights) != len(raw):
            problems.append(f"dpo.loss_weights: {len(d.loss_weights)} weight(s) for {len(raw)} loss(es) in dpo.loss; "
                            "give one weight per loss, or a weight in each entry of the list")
        else:
            for (key, e), w in zip(entries, d.loss_weights):
                if "weight" in e:
                    problems.append(f"{key}.weight: set both here and in dpo.loss_weights; keep one")
                e["weight"] = w
    return entries


def _resolve_term(d: DPOConfig, key: str, e: dict, legacy_used: set, problems: list[str]) -> LossTerm | None:
    name = e.pop("name", None)
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = "needs a name, e.g. {name: sigmoid}" if name is None else f"unknown loss {name!r}{hint}"
        problems.append(f"{key}: {what}; choose one of {', '.join(LOSSES)}")
        return None
    weight = _check(e.pop("weight", 1.0), float, f"{key}.weight", problems)
    spec = LOSSES[name]
    fields = {param_key(f.name): f.name for f in dataclasses.fields(spec.params)}
    hints = typing.get_type_hints(spec.params)
    kwargs: dict[str, Any] = {}
    if "beta" in fields:
        kwargs["beta"] = d.beta
    for legacy, param in LEGACY_LOSS_KEYS.items():
        if getattr(d, legacy) is not None and param in fields:
            kwargs[fields[param]] = getattr(d, legacy)
            legacy_used.add(legacy)
    for k, v in e.items():
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            takes = ", ".join(fields) or "no parameters"
            problems.append(f"{key}.{k}: loss {name!r} has no parameter {k!r}{hint}; its parameters: {takes}")
            continue
        kwargs[fields[k]] = _check(v, hints[fields[k]], f"{key}.{k}", problems)
    try:
        params = spec.params(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the checks above
        problems.append(f"{key}: {err}")
        return None
    # a shared dpo.beta is checked once, as dpo.beta, by validate()
    problems += [f"{key}.{m}" for m in params.problems() if "beta" in e or not m.startswith("beta:")]
    return LossTerm(name, weight if isinstance(weight, float) else 1.0, params)


def unpaired_names() -> list[str]:
    return [n for n, spec in LOSSES.items() if spec.unpaired]


def resolve_loss(d: DPOConfig) -> tuple[list[LossTerm], list[str]]:
    """``dpo.loss`` -> ``(terms, problems)``. The shared ``dpo.beta`` fills every loss's ``beta`` that the
    entry does not set; the older flat keys (``dpo.gamma``, ...) fill the parameter they name and are an
    error when no loss takes it; ``dpo.sft_weight`` appends an ``sft`` term."""
    problems: list[str] = []
    legacy_used: set[str] = set()
    terms = [t for key, e in _loss_entries(d, problems)
             if (t := _resolve_term(d, key, e, legacy_used, problems)) is not None]
    names = ", ".join(t.name for t in terms)
    for legacy, param in LEGACY_LOSS_KEYS.items():
        value = getattr(d, legacy)
        if value is not None and value != LEGACY_DEFAULTS[legacy] and legacy not in legacy_used and terms:
            problems.append(f"dpo.{legacy}: no loss in dpo.loss ({names}) has the parameter {param!r}; remove it")
    if d.sft_weight:
        terms.append(LossTerm("sft", float(d.sft_weight), NoParams()))
    kinds = {LOSSES[t.name].unpaired for t in terms}
    if len(kinds) > 1:
        problems.append(f"dpo.loss: {names} mixes unpaired losses ({', '.join(unpaired_names())}) with paired "
                        "ones; they read different batches")
    return terms, problems


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
    batch_size: int = 64
    """Samples decoded together (on a CPU a wide batch costs little more per step than a narrow one)."""
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
    loss: str | dict[str, Any] | list[Any] | None = None
    """Loss of the rounds' stages, in ``dpo.loss``'s forms (RPO: ``[{name: sigmoid}, {name: sft, weight:
    1.0}]``, DPO plus an NLL term on the chosen samples); null = ``dpo.loss``."""

    def stage_dpo(self, dpo: DPOConfig) -> DPOConfig:
        """The ``dpo`` settings of a round's preference stage: ``dpo`` with the rounds' epochs, learning
        rate and loss. A round is short: its stage evaluates the held-out rows once, at its end, and
        keeps its final model (no early stopping)."""
        loss = {} if self.loss is None else {"loss": self.loss, "loss_weights": None}
        return dataclasses.replace(dpo, enabled=True, epochs=self.epochs, max_steps=None, lr=self.lr or dpo.lr, eval_every=0,
                                   early_stopping=False, **loss)


@dataclass
class GenerationConfig:
    """Which engine samples (rounds, win-rate generations, ``preftune generate``, best-of-n), how the
    round's weights reach it, and the log-prob parity check of its samples against the policy."""

    engine: Literal["builtin", "vllm", "openai"] = "builtin"
    """``builtin``: preftune's batched decode loop; ``vllm``: vLLM's ``LLM`` in this process (installed
    beside preftune); ``openai``: an OpenAI-compatible server at ``base_url`` (``vllm serve``,
    ``preftune serve --enable-lora``, SGLang, ...), prompts sent as token ids."""
    base_url: str | None = None
    """``openai``: the server's URL up to ``/v1`` (e.g. ``http://127.0.0.1:8000/v1``)."""
    api_key_env: str = "OPENAI_API_KEY"
    """``openai``: the environment variable holding the server's API key (never logged; unset: none sent)."""
    served_model: str | None = None
    """``openai``: the name of the base model on the server (null: the first model it lists)."""
    send_seed: bool = True
    """Send a per-request seed (prompt ``i`` gets seed + ``i``); vLLM on CPU refuses one: set false."""
    concurrency: int = 4
    """``openai``: requests in flight at once."""
    timeout: float = 600.0
    """``openai``: seconds a request may take."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """``vllm``: extra keyword arguments of ``vllm.LLM`` (``gpu_memory_utilization``, ``tensor_parallel_size``, ...)."""
    parity_samples: int = 4
    """Completions re-scored under the policy each round (0 = no parity check)."""
    parity_tolerance: float = 0.05
    """Largest allowed mean absolute gap (nats per token) between the engine's log-probs and the policy's."""


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
    trust_remote_code: bool = False
    """Run Python code shipped in a model or tokenizer folder (``auto_map``); off, such folders are refused."""
    allow_pickle: bool = False
    """Load weights stored only as pickle (``pytorch_model.bin``), which can run code; off, they are refused."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data (and SFT data unless ``sft.data`` is set)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning stage."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Preference stage: any loss of the table in losses.py."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation suite."""
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    """On-policy preference rounds after the preference stage."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """The engine everything that samples goes through, and its parity check."""
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


YAML11_EXPONENT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent form without a dot (``1e-4``): YAML 1.1 (PyYAML) reads it as a string."""


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
        if isinstance(value, str) and YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                problems.append(f"{key}: must be a finite number, got {value!r}")
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
            foreign = trl_names.hint(str(k), prefix)  # a TRL or axolotl name: say which key it is here
            hint = f" ({foreign})" if foreign else f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{prefix}{k}'{hint}")
            continue
        kwargs[k] = _check(v, hints[k], prefix + k, problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        problems.append(f"{prefix or 'config'}: {e}")
        return cls()


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["dpo.beta=0.3", "lora.enabled=false"]`` -> ``[("dpo.beta", 0.3), ...]`` (values parsed as YAML)."""
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError([f"override {o!r} is not of the form key=value"], "command line")
        k, v = o.split("=", 1)
        try:
            value = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError([f"{k.strip()}: the value {v!r} is not valid YAML ({problem}); quote it to pass it "
                               "as text, e.g. key='value'"], "command line") from None
        out.append((k.strip(), value))
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


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that records every key given twice in one mapping (plain YAML keeps the last)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                line = key_node.start_mark.line + 1
                self.duplicates.append((line, f"duplicate key '{key}' at line {line} (first at line {first}); keep one"))
        return super().construct_mapping(node, deep)



def load_raw(path: str | Path | None) -> dict:
    """The YAML mapping in ``path``: UTF-8, valid YAML, no key given twice (every duplicate listed)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"], str(p))
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError([f"not valid UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); save the file "
                           "as UTF-8"], str(p)) from None
    loader = _StrictLoader(text)
    try:
        raw = loader.get_single_data() or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([text for _, text in sorted(loader.duplicates)], str(p))
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of keys"], str(p))
    return raw


def nest(key: str, value: Any) -> dict:
    """``("dpo.beta", 0.1)`` -> ``{"dpo": {"beta": 0.1}}``, with config shorthands applied
    (``lora: false`` -> ``lora.enabled``; ``data: FILE`` -> ``data.source``)."""
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return apply_shorthands(node)


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge ``extra`` into ``base`` in place: mappings merge key by key, anything else replaces.
    THE merge of the CLI's overrides and of a sweep's runs: ``lora={r: 8}`` over
    ``lora: {enabled: false, r: 4}`` changes the rank and keeps LoRA off."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the raw config with dotted ``key=value`` overrides deep-merged in order."""
    raw = apply_shorthands(copy.deepcopy(raw))
    for k, v in parse_overrides(list(overrides)):
        merge(raw, nest(k, v))
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply dotted ``key=value`` overrides; raise ConfigError listing every problem."""
    return config_from_dict(apply_overrides(load_raw(path), overrides), str(path) if path else "config")


def validate(cfg: Config) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    p: list[str] = []
    p += _range_problems(cfg, "")
    p += _model_problems(cfg.model)
    d = cfg.dpo
    if isinstance(d, DPOConfig):
        p += _check_losses(d, cfg.data)
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
    r = cfg.rounds
    if isinstance(r, RoundsConfig):
        if r.loss is not None and isinstance(d, DPOConfig):
            p += [m.replace("dpo.loss", "rounds.loss") for m in _check_losses(r.stage_dpo(d), cfg.data)]
        if r.reward == "reward_model" and not r.reward_model:
            p.append("rounds.reward_model: reward 'reward_model' needs the path of a sequence-classification model")
        if isinstance(cfg.generation, GenerationConfig) and cfg.generation.engine == "openai" and \
                not cfg.generation.base_url:
            p.append("generation.base_url: engine 'openai' needs the server's URL, e.g. http://127.0.0.1:8000/v1")
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


def _data_problems(dc: DataConfig, name: str) -> list[str]:
    p = []
    if isinstance(dc.max_drop_fraction, float) and not 0 <= dc.max_drop_fraction <= 1:
        p.append(f"{name}.max_drop_fraction: must be in [0, 1], got {dc.max_drop_fraction}")
    if isinstance(dc.columns, dict) and isinstance(dc.roles, dict):
        p += mapping_problems(dc.columns, dc.roles, name)
    return p



def _check_losses(d: DPOConfig, data: DataConfig) -> list[str]:
    """The losses (resolve_loss) and the options that depend on them: reference, LD-DPO, WPO, TR-DPO, KTO data."""
    terms, p = resolve_loss(d)
    if not terms:
        return p
    names = "+".join(t.name for t in terms)
    needs_ref = any(LOSSES[t.name].needs_reference for t in terms)
    unpaired = any(LOSSES[t.name].unpaired for t in terms)
    if not needs_ref and d.reference not in ("auto", "none"):
        p.append(f"dpo.reference: {names} trains without a reference model; use 'none' or 'auto'")
    if d.ld_alpha is not None and not 0 <= d.ld_alpha <= 1:
        p.append(f"dpo.ld_alpha: must be in [0, 1] (1 is plain DPO), got {d.ld_alpha}")
    if unpaired:
        for key, on in (("ld_alpha", d.ld_alpha is not None), ("wpo", d.wpo)):
            if on:
                p.append(f"dpo.{key}: works on pairs; {names} reads unpaired rows")
        if isinstance(data, DataConfig) and data.format not in ("auto", "kto") and not d.unpair:
            p.append(f"dpo.unpair: {names} reads unpaired rows but data.format is {data.format!r} (pairs); set "
                     "dpo.unpair=true to split each pair into a desirable and an undesirable row, or use kto data")
    elif d.unpair:
        p.append(f"dpo.unpair: only for the unpaired losses ({', '.join(unpaired_names())}), not {names}")
    if d.wpo and (sorting := [t.name for t in terms if not LOSSES[t.name].per_pair]):
        p.append(f"dpo.wpo: not with {', '.join(sorting)}, whose losses are not per pair (the weights would not line up)")
    if d.sync_ref_model:
        if not needs_ref:
            p.append(f"dpo.sync_ref_model: {names} has no reference model to synchronise")
        elif d.reference in ("auto", "precomputed"):
            p.append(f"dpo.sync_ref_model: TR-DPO updates the reference during training, so its log-probs cannot be "
                     f"precomputed (dpo.reference={d.reference!r}); set dpo.reference to copy or adapter")
        if d.ref_model_sync_steps < 1:
            p.append(f"dpo.ref_model_sync_steps: must be at least 1, got {d.ref_model_sync_steps}")
        if not 0 < d.ref_model_mixup_alpha <= 1:
            p.append(f"dpo.ref_model_mixup_alpha: must be in (0, 1], got {d.ref_model_mixup_alpha}")
    return p


def _number_rule(test, text: str):
    return lambda v: None if test(v) else text


AT_LEAST_1 = _number_rule(lambda v: v >= 1, "must be at least 1")
AT_LEAST_0 = _number_rule(lambda v: v >= 0, "must be 0 or more")
POSITIVE = _number_rule(lambda v: v > 0, "must be positive")
FRACTION = _number_rule(lambda v: 0 <= v < 1, "must be in [0, 1)")

RANGES: dict[str, Any] = {
    "Config.threads": AT_LEAST_1, "Config.seed": AT_LEAST_0,
    "LoraConfig.r": AT_LEAST_1, "LoraConfig.alpha": POSITIVE, "LoraConfig.dropout": FRACTION,
    "DataConfig.test_size": FRACTION, "DataConfig.max_rows": AT_LEAST_1, "DataConfig.max_eval_rows": AT_LEAST_0,
    "DataConfig.min_score_ratio": AT_LEAST_0, "DataConfig.max_length": AT_LEAST_1,
    "DataConfig.max_prompt_length": AT_LEAST_0,
    "TrainConfig.lr": POSITIVE, "TrainConfig.epochs": POSITIVE, "TrainConfig.max_steps": AT_LEAST_1,
    "TrainConfig.batch_size": AT_LEAST_1, "TrainConfig.grad_accum": AT_LEAST_1, "TrainConfig.warmup_ratio": FRACTION,
    "TrainConfig.weight_decay": AT_LEAST_0, "TrainConfig.max_grad_norm": POSITIVE, "TrainConfig.eval_every": AT_LEAST_0,
    "TrainConfig.eval_batch_size": AT_LEAST_1, "TrainConfig.log_every": AT_LEAST_1, "TrainConfig.save_every": AT_LEAST_0,
    "TrainConfig.save_total_limit": AT_LEAST_0, "TrainConfig.nan_tolerance": AT_LEAST_1,
    "TrainConfig.patience": AT_LEAST_1, "TrainConfig.min_delta": AT_LEAST_0,
    "DPOConfig.beta": POSITIVE, "DPOConfig.label_smoothing": _number_rule(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "DPOConfig.gamma": AT_LEAST_0, "DPOConfig.orpo_lambda": AT_LEAST_0, "DPOConfig.sft_weight": AT_LEAST_0,
    "DPOConfig.token_budget": AT_LEAST_1,
    "WinrateConfig.per_category": AT_LEAST_1, "WinrateConfig.max_new_tokens": AT_LEAST_1,
    "WinrateConfig.temperature": AT_LEAST_0, "WinrateConfig.top_p": _number_rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "WinrateConfig.max_calls": AT_LEAST_0, "WinrateConfig.concurrency": AT_LEAST_1,
    "WinrateConfig.requests_per_second": POSITIVE,
    "HeldoutConfig.chunk_length": AT_LEAST_1, "HeldoutConfig.max_chunks": AT_LEAST_1,
    "EvalConfig.batch_size": AT_LEAST_1, "EvalConfig.tasks_limit": AT_LEAST_1,
    "EvalConfig.curve_every": _number_rule(lambda v: v >= 0, "must be 0 (off) or a positive number of steps"),
    "RoundsConfig.n": AT_LEAST_0, "RoundsConfig.mix_offline": AT_LEAST_0, "RoundsConfig.prompts": AT_LEAST_1,
    "RoundsConfig.batch_size": AT_LEAST_1,
    "RoundsConfig.max_new_tokens": AT_LEAST_1,
    "RoundsConfig.samples": _number_rule(lambda v: v >= 2, "a pair needs at least 2 samples per prompt"),
    "RoundsConfig.temperature": _number_rule(lambda v: v > 0, "on-policy pairs need sampling (a positive temperature)"),
    "RoundsConfig.top_p": _number_rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "RoundsConfig.epochs": POSITIVE, "RoundsConfig.lr": POSITIVE,
    "GenerationConfig.concurrency": AT_LEAST_1, "GenerationConfig.timeout": POSITIVE,
    "GenerationConfig.parity_samples": AT_LEAST_0, "GenerationConfig.parity_tolerance": POSITIVE,
}
"""Allowed ranges by ``Class.field`` (a field of a base class covers its subclasses); null passes."""


def _range_problems(node: Any, prefix: str) -> list[str]:
    """Every number outside its range in RANGES, walking the nested configs."""
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += _range_problems(value, f"{prefix}{f.name}.")
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue  # null, "auto", or a type problem already reported
        rule = next((RANGES[k] for c in type(node).__mro__ if (k := f"{c.__name__}.{f.name}") in RANGES), None)
        if rule is not None and (why := rule(value)):
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
    return []


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


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


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


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
