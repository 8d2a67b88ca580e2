"""The config's schema: a dataclass per section, each field with its docstring and its range rule in its
metadata (``setting(default, rule)``). Loading is load.py's, cross-field rules validate.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from preftune.embedded import SMOLLM2
from preftune.errors import PreftuneError

EMBEDDED_MODEL = SMOLLM2

Rule = Callable[[float], "str | None"]  # a number -> None when allowed, else what is wrong


def rule(test: Callable[[float], bool], text: str) -> Rule:
    return lambda v: None if test(v) else text


AT_LEAST_1 = rule(lambda v: v >= 1, "must be at least 1")
AT_LEAST_0 = rule(lambda v: v >= 0, "must be 0 or more")
POSITIVE = rule(lambda v: v > 0, "must be positive")
FRACTION = rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT_INTERVAL = rule(lambda v: 0 < v <= 1, "must be in (0, 1]")


def setting(default: Any = dataclasses.MISSING, rule: Rule | None = None, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field whose number must pass ``rule`` (null, ``auto`` and non-numbers are not range-checked)."""
    return field(default=default, default_factory=factory, metadata={"range": rule})


def range_rule(f: dataclasses.Field) -> Rule | None:
    """The range rule of a config field, if it has one."""
    return f.metadata.get("range")


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
    r: int = setting(16, AT_LEAST_1)
    """LoRA rank."""
    alpha: int = setting(32, POSITIVE)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = setting(0.0, FRACTION)
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
    test_size: float = setting(0.1, FRACTION)
    """Fraction carved off as the held-out split when the source has none."""
    max_rows: int | None = setting(None, AT_LEAST_1)
    """Use at most this many training rows (after shuffling with the seed)."""
    max_eval_rows: int | None = setting(None, AT_LEAST_0)
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
    min_score_ratio: float = setting(2.0, AT_LEAST_0)
    """SHP only: keep a pair when score(chosen) / score(rejected) is at least this; at most 1 (or a
    file without score columns) keeps every pair."""
    max_length: int = setting(512, AT_LEAST_1)
    """Token budget for prompt + one completion."""
    max_prompt_length: int = setting(256, AT_LEAST_0)
    """The prompt keeps its last this-many tokens."""
    test_source: str | None = None
    """Held-out rows from another source (a file or folder, all of it held out) instead of a split of
    ``source``; on-policy rounds use it to train on their own pairs and evaluate on the run's held-out rows."""
    num_proc: int | None = None
    """Processes that tokenize (null: the cores, at most 8; 1: this process only)."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Several sources instead of ``source`` (the alignment-handbook's ``dataset_mixer``): each entry's
    first ``fraction`` of its training rows, and its ``test_split`` rows when it has them (else
    ``test_size`` is carved off the mixed rows)."""
    chat_template: str | None = None
    """A Jinja chat template (the text, or the path of a file holding it) that replaces the tokenizer's,
    for training's tokenization and generation alike (top-level ``data`` only; it serves every stage)."""


@dataclass
class MixtureSource:
    """One source of ``data.mixture``: where, how much, and (where it differs from ``data``'s) its
    split, format and column and role mapping."""

    source: str = ""
    """A local file or folder, ``embedded:NAME`` or a Hub dataset (required)."""
    fraction: float = setting(1.0, UNIT_INTERVAL)
    """Share of its training rows used: the first ``round_down(fraction * rows)``, as the handbook takes them."""
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str | None = None
    """Its training split (null: ``data.split``)."""
    format: str | None = None
    """Its row format (null: ``data.format``)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Its ``data.columns`` (empty: ``data``'s)."""
    roles: dict[str, str] = field(default_factory=dict)
    """Its ``data.roles`` (empty: ``data``'s)."""


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

    lr: float = setting(1e-4, POSITIVE)
    """Peak learning rate (AdamW)."""
    epochs: float = setting(1.0, POSITIVE)
    """Passes over the training data; ignored when ``max_steps`` is set."""
    max_steps: int | None = setting(None, AT_LEAST_1)
    """Optimizer steps to run; overrides ``epochs``."""
    batch_size: int = setting(4, AT_LEAST_1)
    """Rows (pairs for preference methods) per micro-batch per process."""
    grad_accum: int = setting(1, AT_LEAST_1)
    """Micro-batches per optimizer step."""
    drop_last: bool = False
    """Drop an epoch's last incomplete optimizer step (its rows are counted in the log) instead of
    taking it with fewer micro-batches, weighted by the rows it holds."""
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                      "warmup_stable_decay", "polynomial"] = "cosine"
    """Learning-rate decay after warm-up: preftune's cosine, linear or constant, or one of transformers'
    schedules computed by its own functions (constant_with_warmup, inverse_sqrt, cosine_with_min_lr,
    warmup_stable_decay, polynomial)."""
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of a transformers schedule (TRL's ``lr_scheduler_kwargs``): ``min_lr_rate`` or ``min_lr``
    (cosine_with_min_lr), ``num_decay_steps``, ``decay_type``, ``min_lr_ratio`` (warmup_stable_decay),
    ``lr_end``, ``power`` (polynomial), ``timescale`` (inverse_sqrt)."""
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """AdamW: torch's (``adamw_fused``: its fused kernel where torch has one) or bitsandbytes' 8-bit or
    paged variants (CUDA only; refused on a CPU)."""
    warmup_ratio: float = setting(0.1, FRACTION)
    """Fraction of the steps spent warming up linearly from 0."""
    warmup_steps: int | None = setting(None, AT_LEAST_0)
    """Warm-up length in optimizer steps (TRL's ``warmup_steps``); set, it replaces ``warmup_ratio``."""
    weight_decay: float = setting(0.0, AT_LEAST_0)
    """AdamW weight decay."""
    max_grad_norm: float | None = setting(1.0, POSITIVE)
    """Clip the global gradient norm to this; null disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    eval_every: int = setting(0, AT_LEAST_0)
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_batch_size: int = setting(8, AT_LEAST_1)
    """Rows per evaluation batch."""
    log_every: int = setting(1, AT_LEAST_1)
    """Write a metrics line every N optimizer steps."""
    save_every: int = setting(0, AT_LEAST_0)
    """Write a checkpoint every N steps (0: only the final model)."""
    save_total_limit: int = setting(2, AT_LEAST_0)
    """Keep at most this many step checkpoints (``best/`` and ``final/`` are kept apart)."""
    nan_tolerance: int = setting(5, AT_LEAST_1)
    """Abort after this many consecutive steps with a NaN/inf loss (each one is skipped with a warning)."""
    early_stopping: bool = False
    """Stop when the eval metric stops improving and keep ``best/``."""
    early_stopping_metric: str = "eval/rewards/accuracies"
    """Metric that early stopping and ``best/`` follow."""
    early_stopping_mode: Literal["max", "min"] = "max"
    """Whether a larger metric is better."""
    patience: int = setting(3, AT_LEAST_1)
    """Eval rounds without improvement before stopping."""
    min_delta: float | Literal["auto"] = setting("auto", AT_LEAST_0)
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
    lr: float = setting(5e-5, POSITIVE)
    """Peak learning rate (AdamW)."""
    enabled: bool = True
    """Run this stage in ``preftune pipeline``."""
    loss: str | dict[str, Any] | list[Any] = "sigmoid"
    """Preference loss: a name (``sigmoid``), a name with parameters (``{name: simpo, beta: 2.0, gamma:
    0.5}``) or a weighted list (``[{name: sigmoid}, {name: sft, weight: 0.5}]``); the names and their
    parameters are the table in losses.py (``preftune losses``, docs/methods.md)."""
    loss_weights: list[float] | None = None
    """TRL-style weights for a list of loss names, one per loss (instead of ``weight`` in each entry)."""
    beta: float = setting(0.1, POSITIVE)
    """Strength of the KL penalty (DPO family) or reward scale (SimPO, CPO, KTO), for every loss that
    takes a ``beta`` and does not set its own."""
    label_smoothing: float | None = setting(None, rule(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"))
    """Older form of the loss parameter ``label_smoothing``."""
    ipo_normalize: Literal["mean", "sum"] | None = None
    """Older form of ipo's ``normalize``."""
    gamma: float | None = setting(None, AT_LEAST_0)
    """Older form of the loss parameter ``gamma`` (SimPO's margin)."""
    orpo_lambda: float | None = setting(None, AT_LEAST_0)
    """Older form of orpo's ``lambda``."""
    sft_weight: float | None = setting(None, AT_LEAST_0)
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
    token_budget: int = setting(2048, AT_LEAST_1)
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
    per_category: int = setting(256, AT_LEAST_1)
    """Prompts per category, as in the study."""
    max_new_tokens: int = setting(128, AT_LEAST_1)
    """Generation length cap."""
    temperature: float = setting(0.0, AT_LEAST_0)
    """Sampling temperature for generation (0 = greedy)."""
    top_p: float = setting(1.0, UNIT_INTERVAL)
    """Nucleus sampling."""
    max_calls: int | None = setting(None, AT_LEAST_0)
    """Cap on judge calls (cost)."""
    concurrency: int = setting(4, AT_LEAST_1)
    """Concurrent judge calls."""
    requests_per_second: float = setting(10.0, POSITIVE)
    """Judge rate limit."""


@dataclass
class HeldoutConfig:
    enabled: bool = True
    """Measure held-out LM loss (forgetting)."""
    corpus: str = "embedded:lee"
    """Plain-text corpus: ``embedded:lee`` or a local .txt/.jsonl file."""
    chunk_length: int = setting(256, AT_LEAST_1)
    """Tokens per scored chunk."""
    max_chunks: int | None = setting(64, AT_LEAST_1)
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
    tasks_limit: int | None = setting(None, AT_LEAST_1)
    """Examples per downstream task."""
    batch_size: int = setting(8, AT_LEAST_1)
    """Batch size for generation and scoring."""
    curve_every: int = setting(0, rule(lambda v: v >= 0, "must be 0 (off) or a positive number of steps"))
    """Snapshot the preference stage every N optimizer steps and evaluate every snapshot (win-rate,
    checked accuracy, downstream tasks) for the report's curves against tokens seen; 0 = off."""
    datasets: list[EvalDatasetConfig] = field(default_factory=list)
    """Extra preference datasets every model is also evaluated on (the study's Tables 5 and 6): win-rate
    against their chosen responses, reward accuracy and checked accuracy on each one's held-out rows."""


@dataclass
class RoundsConfig:
    """On-policy preference rounds (semi-online DPO): sample from the current policy, score the samples,
    train on the best against the worst, repeat."""

    n: int = setting(0, AT_LEAST_0)
    """Rounds to run (``preftune iterate``, and ``preftune pipeline`` after the offline DPO stage); 0 = off."""
    prompts: int = setting(64, AT_LEAST_1)
    """Training prompts drawn per round (seeded; never a held-out prompt)."""
    samples: int = setting(4, rule(lambda v: v >= 2, "a pair needs at least 2 samples per prompt"))
    """Completions sampled per prompt."""
    temperature: float = setting(1.0, rule(lambda v: v > 0, "on-policy pairs need sampling (a positive temperature)"))
    """Sampling temperature."""
    top_p: float = setting(1.0, UNIT_INTERVAL)
    """Nucleus sampling."""
    max_new_tokens: int = setting(64, AT_LEAST_1)
    """Length cap of each sample."""
    batch_size: int = setting(64, AT_LEAST_1)
    """Samples decoded together (on a CPU a wide batch costs little more per step than a narrow one)."""
    reward: Literal["rule", "judge", "reward_model"] = "rule"
    """How samples are scored: ``rule`` (the row's checkable answer), ``judge`` (the ``eval.winrate``
    judge against the row's chosen response, both orders) or ``reward_model`` (a local classifier)."""
    reward_model: str | None = None
    """``reward: reward_model``: a local AutoModelForSequenceClassification folder."""
    mix_offline: int = setting(0, AT_LEAST_0)
    """Offline training pairs mixed into each round's pairs."""
    reference: Literal["round_start", "sft"] = "round_start"
    """Each round's reference: the policy the round starts from, or the SFT model (LoRA: the round
    keeps training the previous round's adapter, whose disabled state is the SFT model)."""
    epochs: float = setting(1.0, POSITIVE)
    """Passes over a round's pairs (the round's stage otherwise takes its settings from ``dpo``)."""
    lr: float | None = setting(None, POSITIVE)
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
class Config:
    model: str = EMBEDDED_MODEL
    """``embedded:smollm2-135m-instruct``, ``tiny:`` (random 2-layer Llama for tests), a local path, or a Hub name (online)."""
    model_revision: str | None = None
    """A Hub model's revision (branch, tag or commit; null: main): model and tokenizer load from that
    snapshot; recorded in run.json and the model card."""
    tokenizer: str | None = None
    """Tokenizer path when it differs from the model's."""
    precision: Literal["fp32", "bf16", "bf16-mixed"] = "fp32"
    """fp32; bf16 = pure bf16 weights; bf16-mixed = fp32 weights with bf16 autocast."""
    attn_implementation: str | None = None
    """transformers attention backend (sdpa, eager, flex_attention, flash_attention_2); null = model
    default. flex_attention takes the prefix-shared layouts as a BlockMask (training on CUDA only);
    flash_attention_2 takes only the padded layout."""
    seed: int = setting(0, AT_LEAST_0)
    """Seed for data order, initialisation and sampling."""
    output_dir: str = "runs/default"
    """Run folder."""
    threads: int | None = setting(None, AT_LEAST_1)
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
    report_to: list[str] = field(default_factory=list)
    """Trackers: tensorboard, wandb, mlflow (the ``track`` extra)."""
    push_to: str | None = None
    """Hub repo id the finished run's model is pushed to with its card (as ``preftune push`` does); null: no push."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """Sweep axes (``preftune sweep``): dotted key -> list of values, or ``variants: [...]``."""


# ---------------------------------------------------------------- loading and validation
