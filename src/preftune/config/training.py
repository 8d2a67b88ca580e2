"""The config's training sections: the model's LoRA, the data, and each stage's loop settings (SFT, the
preference stage, the reward model). Each field has its docstring and, in its metadata, its range rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from preftune.config.rules import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, UNIT_INTERVAL, rule, setting


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
class RMConfig(TrainConfig):
    """A Bradley-Terry reward model (``preftune rm``): the causal LM with a scalar head, trained on the
    preference data (``data``) with ``-log sigmoid(r_chosen - r_rejected - margin)``."""

    enabled: bool = False
    """Run this stage in ``preftune pipeline`` (after SFT, from the SFT model); its reward model then serves
    ``rounds.reward: reward_model`` and ``eval.winrate.judge: reward_model`` when they name none."""
    center_rewards_coefficient: float | None = setting(None, AT_LEAST_0)
    """TRL's reward centring (Eisenstein et al. 2023): adds ``c * mean((r_chosen + r_rejected)^2)``; null = off."""
    margin_column: str | None = None
    """A numeric column of the data (kept in each row's meta) subtracted inside the sigmoid, as in TRL and
    Llama 2; null = no margin."""
    layout: Literal["auto", "padded", "prefix_shared", "packed"] = "auto"
    """Batch layout; ``auto`` picks prefix sharing (the prompt's forward shared by chosen and rejected)."""
    token_budget: int = setting(2048, AT_LEAST_1)
    """``packed`` layout: prompt + chosen + rejected tokens per micro-batch (replaces ``batch_size``)."""
    early_stopping_metric: str = "eval/accuracy"
    """Metric that early stopping and ``best/`` follow (held-out accuracy: r_chosen > r_rejected)."""
