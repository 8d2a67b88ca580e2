"""The config's schema: the root ``Config`` over its sections (training.py, evaluation.py), each field with
its docstring and its range rule in its metadata (rules.py). Loading is load.py's, cross-field rules
validate.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from preftune.config.evaluation import (
    BonConfig,
    EvalConfig,
    EvalDatasetConfig,
    GenerationConfig,
    HeldoutConfig,
    RoundsConfig,
    WinrateConfig,
)
from preftune.config.rules import AT_LEAST_0, AT_LEAST_1, range_rule, setting
from preftune.config.training import (
    DataConfig,
    DPOConfig,
    LoraConfig,
    MixtureSource,
    RMConfig,
    SFTConfig,
    TrainConfig,
)
from preftune.embedded import SMOLLM2
from preftune.errors import PreftuneError

EMBEDDED_MODEL = SMOLLM2

__all__ = ["EMBEDDED_MODEL", "BonConfig", "Config", "ConfigError", "DataConfig", "DPOConfig", "EvalConfig",
           "EvalDatasetConfig", "GenerationConfig", "HeldoutConfig", "LoraConfig", "MixtureSource", "RMConfig",
           "RoundsConfig", "SFTConfig", "TrainConfig", "WinrateConfig", "range_rule"]


class ConfigError(PreftuneError):
    """One or more problems in a config; ``problems`` lists them all."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


@dataclass
class Config:
    model: str = EMBEDDED_MODEL
    """``embedded:smollm2-135m-instruct``, ``tiny:`` (random 2-layer Llama for tests), a local path, or a Hub name (online)."""
    model_revision: str | None = None
    """A Hub model's revision (branch, tag or commit; null: main): model and tokenizer load from that
    snapshot; recorded in run.json and the model card."""
    tokenizer: str | None = None
    """Tokenizer path when it differs from the model's."""
    precision: Literal["fp32", "bf16", "bf16-mixed", "auto"] = "fp32"
    """fp32; bf16 = pure bf16 weights; bf16-mixed = fp32 weights with bf16 autocast; auto = bf16-mixed
    where this machine runs bf16 matmuls at least 1.5x faster than fp32 (a GPU with bf16, a CPU with AMX
    or AVX-512 BF16), else fp32, decided when the config loads (the run records the choice)."""
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
    rm: RMConfig = field(default_factory=RMConfig)
    """Reward model stage (``preftune rm``; optional in the pipeline)."""
    bon: BonConfig = field(default_factory=BonConfig)
    """Best-of-n sampling (``preftune bon``; optional in the pipeline)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation suite."""
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    """On-policy preference rounds after the preference stage."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """The engine everything that samples goes through, and its parity check."""
    report_to: list[str] = field(default_factory=list)
    """Trackers: tensorboard, wandb, mlflow (the ``track`` extra)."""
    push_to: str | None = None
    """Hub repo id the finished run's model is pushed to with its card (as ``preftune push`` does); null: no push."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """Sweep axes (``preftune sweep``): dotted key -> list of values, or ``variants: [...]``."""
