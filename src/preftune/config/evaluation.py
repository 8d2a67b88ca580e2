"""The config's sections that sample and measure: best-of-n, the evaluation suite (win-rate, held-out
loss, extra datasets), the on-policy rounds and the generation engine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from preftune.config.rules import AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT_INTERVAL, rule, setting
from preftune.config.training import DataConfig, DPOConfig


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
class BonConfig:
    """Best-of-n sampling (``preftune bon``): ``rounds.samples`` answers per training prompt, sampled and
    scored with the ``rounds`` settings (``rounds.reward``), the best kept as SFT rows."""

    enabled: bool = False
    """Run it in ``preftune pipeline``, after SFT (and the reward model), before DPO."""
    prompts: int | None = setting(None, AT_LEAST_1)
    """Training prompts to sample (a seeded draw); null = every training prompt."""


@dataclass
class WinrateConfig:
    enabled: bool = True
    """Judge generations against the dataset's chosen responses."""
    judge: str = "rule"
    """Judge backend: a name in eval/judges.py's ``JUDGES`` (rule, openai, hf; ``reward_model``: the response
    with the higher reward wins, equal rewards tie)."""
    judge_model: str | None = None
    """Model name for the openai judge, or path for the hf and reward_model judges (a ``preftune rm``
    folder, or any one-label AutoModelForSequenceClassification)."""
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
    categories: Literal["rows", "hh"] = "rows"
    """Where the win-rate prompts and their categories come from: ``rows`` (the held-out rows, by each
    row's category, else one category ``all``) or ``hh`` (the study's draw: ``per_category`` prompts
    from each of HH's ``helpful-base`` and ``harmless-base`` test splits of ``data.source``, seeded)."""
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
    """Plain-text corpus: ``embedded:lee``, a local .txt/.jsonl file, or a dataset read through
    ``datasets`` (streamed): a Hub name (online, e.g. ``cerebras/SlimPajama-627B``) or a local dataset folder."""
    subset: str | None = None
    """Dataset configuration name of a ``datasets`` corpus."""
    split: str = "validation"
    """Split of a ``datasets`` corpus."""
    text_column: str = "text"
    """Column holding the text of a ``datasets`` corpus."""
    max_documents: int = setting(2000, AT_LEAST_1)
    """Documents read from a ``datasets`` corpus (the first ones of the split, in order; cached)."""
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
    """``reward: reward_model``: a local AutoModelForSequenceClassification folder, such as a ``preftune rm``
    run (scored on the ids it trained on); null with ``rm.enabled`` in the pipeline: the run's own."""
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
    concurrency: int = setting(8, AT_LEAST_1)
    """``openai``: requests in flight at once (vLLM batches them: raise it for a vLLM server, e.g. 32;
    ``preftune serve`` queues 8 by default)."""
    timeout: float = setting(600.0, POSITIVE)
    """``openai``: seconds a request may take."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """``vllm``: extra keyword arguments of ``vllm.LLM`` (``gpu_memory_utilization``, ``tensor_parallel_size``, ...)."""
    parity_samples: int = setting(4, AT_LEAST_0)
    """Completions re-scored under the policy each round (0 = no parity check)."""
    parity_tolerance: float = setting(0.05, POSITIVE)
    """Largest allowed mean absolute gap (nats per token) between the engine's log-probs and the policy's."""
