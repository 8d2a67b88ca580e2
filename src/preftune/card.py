"""Model cards: the ``README.md`` written beside every saved model, adapter and merged folder, built
with huggingface_hub's ``ModelCard``/``ModelCardData`` (the Hub's metadata, with the evaluation as a
machine-readable ``model-index``), refreshed with results after the suite runs. Exporting and pushing a model live in export.py."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from preftune import embedded
from preftune.config import Config
from preftune.config.validate import config_from_dict
from preftune.losses import LOSSES
from preftune.paths import RunDir, StageDir
from preftune.report.table import CARD, markdown_table, results_table

HUB_IDS = {embedded.SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""preftune's model names -> the Hub id a card's ``base_model`` should name."""
LICENSES = {embedded.SMOLLM2: "apache-2.0"}
"""Known licenses of the models preftune ships."""
METHOD_NAMES = {"sft": "supervised fine-tuning (SFT)", "dpo": "Direct Preference Optimization (DPO)",
                "orpo": "ORPO (odds-ratio preference optimization, no reference model)",
                "simpo": "SimPO (reference-free, length-normalised rewards)",
                "cpo": "CPO (contrastive preference optimization, no reference model)",
                "alphapo": "AlphaPO (reference-free, reshaped length-normalised rewards)",
                "kto": "KTO (unpaired desirable/undesirable completions)",
                "reward-model": "a Bradley-Terry reward model (one-label sequence classifier)"}
"""Hub tag of a method family -> its name on the card."""
LOCAL_PREFIXES = ("embedded:", "tiny", "/", ".", "~")


# ---------------------------------------------------------------- the card


def method_tag(method: str) -> str:
    """run.json's ``method`` (``sft``, a loss name, or names joined by ``+``) -> the Hub tag of its family:
    the ``tag`` of its first loss that is not ``sft`` in the loss table."""
    if method == "rm":
        return "reward-model"
    names = [n for n in method.split("+") if n in LOSSES]
    main = next((n for n in names if n != "sft"), names[0] if names else None)
    return LOSSES[main].tag if main else ("sft" if method == "sft" else "dpo")


def _license(cfg: Config) -> str | None:
    """The base model's license: known for the shipped model, else from its own card's metadata."""
    if cfg.model in LICENSES:
        return LICENSES[cfg.model]
    readme = Path(cfg.model).expanduser() / "README.md"
    meta = front_matter(readme.read_text()) if readme.is_file() else {}
    return meta.get("license") if isinstance(meta.get("license"), str) else None


def dataset_name(source: str) -> str:
    """A data source as a card names it: a Hub id or ``embedded:`` name as is, a local path by its
    file or folder name (a card must not carry the training machine's paths)."""
    if source.startswith("embedded:"):
        return source
    if source.startswith(LOCAL_PREFIXES) or Path(source).exists():
        return Path(source).name or source
    return source


def _stage_sources(cfg: Config, summary: dict) -> list[str]:
    if summary.get("stage") == "sft":
        return [cfg.sft.data.source if cfg.sft.data is not None else cfg.data.source]
    return [cfg.data.source]


def parent_stage(summary: dict) -> Path | None:
    """The stage folder this stage was trained from (a pipeline's DPO over ``sft/merged`` or
    ``sft/final``), or None when it was trained from the configured model."""
    base = summary.get("base_model")
    if not base:
        return None
    folder = Path(base).parent
    return folder if StageDir(folder).is_finished() else None


def base_model(cfg: Config, summary: dict, base_repo: str | None = None) -> str | None:
    """What the card's ``base_model`` names: the weights this model was trained from. ``base_repo``
    (where ``push``/``export`` put a local base) wins; a base that is a local folder of this run (the
    merged SFT model) has no Hub id, so None; else the configured model's Hub id."""
    if base_repo:
        return base_repo
    if parent_stage(summary) is not None:
        return None
    if cfg.model in HUB_IDS:
        return HUB_IDS[cfg.model]
    return None if cfg.model.startswith(LOCAL_PREFIXES) or Path(cfg.model).exists() else cfg.model


def metadata(cfg: Config, summary: dict, base_repo: str | None = None, merged: bool = False) -> dict:
    """The card's YAML front matter (without the evaluation), as a plain dict."""
    return card_data(cfg, summary, base_repo=base_repo, merged=merged).to_dict()


def card_data(cfg: Config, summary: dict, eval_entry: dict | None = None, name: str = "model",
              base_repo: str | None = None, merged: bool = False) -> ModelCardData:
    """The Hub metadata: base model, library, tags, datasets, license, and the evaluation figures of
    ``eval_entry`` (one model of eval.json) as ``eval_results``, which ModelCardData writes as model-index."""
    tag = method_tag(str(summary.get("method")))
    lora = bool(summary.get("lora", cfg.lora.enabled)) and not merged
    results = eval_results(cfg, eval_entry or {})
    return ModelCardData(
        base_model=base_model(cfg, summary, base_repo), library_name="peft" if lora else "transformers",
        pipeline_tag="text-classification" if tag == "reward-model" else "text-generation", tags=["preftune", tag] + (["lora"] if lora else []) + (["merged"] if merged else []),
        datasets=list(dict.fromkeys(dataset_name(s) for s in _stage_sources(cfg, summary))),
        license=_license(cfg), model_name=name, eval_results=results or None,
    )


def eval_results(cfg: Config, e: dict) -> list[EvalResult]:
    """One model's figures of eval.json as Hub ``EvalResult``s: held-out reward accuracy, win-rate
    against the chosen responses, held-out bits per byte, and each downstream task's accuracy."""
    data = dataset_name(cfg.data.source)
    split = cfg.data.test_split or "held-out"
    out: list[EvalResult] = []

    def add(task: str, dataset: str, metric: str, value, metric_name: str, dataset_split: str | None = None):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out.append(EvalResult(task_type="text-generation", task_name=task, dataset_type=dataset,
                                  dataset_name=dataset, dataset_split=dataset_split, metric_type=metric,
                                  metric_name=metric_name, metric_value=round(float(value), 6)))

    # one task on the held-out preference split, two metrics (model-index groups results by task and dataset)
    held_out = "Preference alignment (held-out pairs)"
    add(held_out, data, "accuracy", e.get("rewards", {}).get("rewards/accuracies"), "rewards/accuracies", split)
    add(held_out, data, "win_rate", e.get("winrate", {}).get("winrate"),
        f"win-rate vs chosen ({cfg.eval.winrate.judge} judge)", split)
    add("Held-out language modelling (forgetting)", dataset_name(cfg.eval.heldout.corpus), "bits_per_byte",
        e.get("heldout", {}).get("bpb"), "bits per byte")
    for task, r in (e.get("tasks") or {}).items():
        if isinstance(r, dict):
            add(f"Downstream task {task}", task, "accuracy", r.get("acc"), "acc")
    return out


def _fmt(x, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _method_lines(cfg: Config, summary: dict) -> list[str]:
    method = str(summary.get("method") or "sft")
    family = method_tag(method)
    lines = [f"- **Method:** {METHOD_NAMES.get(family, family)}"]
    if summary.get("stage") == "rm":
        acc = summary.get("eval_accuracy")
        lines.append("- **Loss:** Bradley-Terry, `-log sigmoid(r_chosen - r_rejected - margin)`; **held-out "
                     f"accuracy** {_fmt(acc) if acc is not None else '-'} (r_chosen > r_rejected on the held-out pairs)")
    elif summary.get("stage") != "sft":
        lines.append(f"- **Loss:** `{method}`, **beta** {summary.get('beta') or cfg.dpo.beta:g}")
        lines.append(f"- **Reference:** {summary.get('reference', cfg.dpo.reference)}")
    lines.append(f"- **Precision:** {summary.get('precision', cfg.precision)}")
    if cfg.lora.enabled:
        lr = cfg.lora
        lines.append(f"- **LoRA:** r={lr.r}, alpha={lr.alpha}, dropout={lr.dropout:g}, "
                     f"target_modules={', '.join(lr.target_modules)}" + (", 4-bit base (QLoRA)" if lr.quantize_4bit else ""))
    else:
        lines.append("- **LoRA:** no (all weights trained)")
    return lines


def _drops(report: dict) -> str:
    dropped = report.get("dropped") or {}
    return ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "none"


def _truncated(value) -> str:
    """Truncation counts: ``{prompt: N, completion: M}`` (older runs wrote one number)."""
    if isinstance(value, dict):
        return f"{value.get('prompt', 0)} prompts and {value.get('completion', 0)} completions"
    return str(value or 0)


def _data_lines(cfg: Config, summary: dict, data_report: dict) -> list[str]:
    stage_data = cfg.sft.data if summary.get("stage") == "sft" and cfg.sft.data is not None else cfg.data
    read = data_report.get("read", {})
    lines = [f"- **Source:** `{stage_data.source}` (format {read.get('format', stage_data.format)}, split {stage_data.split})",
             f"- **Fingerprint:** `{summary.get('data_fingerprint') or data_report.get('fingerprint', '-')}`",
             f"- **Read:** {read.get('rows_read', '-')} rows, kept {read.get('rows_kept', '-')}; "
             f"dropped: {_drops(read)}"]
    for part in ("tokenize_train", "tokenize_test"):
        t = data_report.get(part)
        if t:
            lines.append(f"- **Tokenized ({part.removeprefix('tokenize_')}):** {t.get('rows_in')} in, {t.get('kept')} kept, "
                         f"{_truncated(t.get('truncated'))} truncated; dropped: {_drops(t)}")
    lines.append(f"- **Lengths:** max_length {stage_data.max_length}, max_prompt_length {stage_data.max_prompt_length}")
    return lines


def _training_lines(summary: dict) -> list[str]:
    best = summary.get("best_step")
    metric = summary.get("early_stopping_metric")
    return [
        f"- **Steps:** {summary.get('steps', '-')} of {summary.get('total_steps', '-')}"
        + (" (stopped early)" if summary.get("stopped_early") else ""),
        f"- **Training tokens:** {summary.get('tokens_seen', '-')} ({summary.get('pairs_seen', '-')} rows/pairs seen)",
        f"- **Best step:** {best if best is not None else '-'}"
        + (f" by `{metric}` = {_fmt(summary.get('best_metric'))}" if best is not None and metric else ""),
        f"- **Wall time:** {summary.get('wall_time_s', '-')} s",
        f"- **Preflight:** {_preflight(summary.get('preflight'))}",
    ]


def _preflight(record: dict | None) -> str:
    """run.json's ``preflight`` in one line: which checks passed before the first step, or why none ran."""
    if not record:
        return "-"
    if "skipped" in record:
        return f"skipped ({record['skipped']})"
    checks = {k: v for k, v in record.items() if isinstance(v, dict)}
    passed = [k for k, v in checks.items() if v.get("ok")]
    return f"{len(passed)} of {len(checks)} checks passed ({', '.join(passed)})"


def _eval_lines(eval_results: dict, model_name: str | None) -> list[str]:
    """The card's Markdown results table (the base and this model), one line per row."""
    models = eval_results.get("models", eval_results)
    names = [n for n in ("base", model_name) if n and n in models] or list(models)
    return markdown_table(*results_table({n: models[n] for n in names}, CARD)).splitlines()


def lineage(cfg: Config, summary: dict, base_repo: str | None = None) -> str:
    """One sentence naming the weights this model was trained from, truly (a card's first line)."""
    origin = HUB_IDS.get(cfg.model, cfg.model) + (f"` at revision `{cfg.model_revision}" if cfg.model_revision else "")
    parent = parent_stage(summary)
    if parent is None:
        converted = " (converted from its Q4_1 GGUF)" if cfg.model == embedded.SMOLLM2 else ""
        return f"Trained with preftune from `{origin}`{converted}."
    where = f"`{base_repo}`" if base_repo else f"`{parent.name}/{Path(summary['base_model']).name}` of the same run"
    return (f"Trained with preftune from this run's {parent.name.upper()} model ({where}), "
            f"itself trained from `{origin}`.")


def model_card(cfg: Config, summary: dict, data_report: dict, eval_results: dict | None = None,
               model_name: str | None = None, base_repo: str | None = None, merged: bool = False) -> str:
    """The README.md of a saved model: Hub metadata (with ``model-index``), then method, data,
    training and evaluation.

    ``summary`` is the stage's ``run.json``; ``data_report`` the read/tokenize reports of its
    ``data.json``; ``eval_results`` the suite's ``eval.json`` (its ``model_name`` entry and the base).
    ``base_repo`` names the base by a Hub id (``push``/``export``); ``merged`` is the card of the
    adapter merged into its base (a full model)."""
    stage = summary.get("stage", "dpo")
    key = model_name or stage
    name = f"{Path(cfg.output_dir).name or 'model'}-{stage}" + ("-merged" if merged else "")
    models = (eval_results or {}).get("models", eval_results or {})
    data = card_data(cfg, summary, models.get(key), name, base_repo, merged)
    lines = [f"# {name}", "", lineage(cfg, summary, base_repo)
             + (" This folder is its LoRA adapter merged into that base: a full model." if merged else ""),
             "", "## Method", "", *_method_lines(cfg, summary), "", "## Data", "", *_data_lines(cfg, summary, data_report),
             "", "## Training", "", *_training_lines(summary), ""]
    if eval_results:
        lines += ["## Evaluation", "", *_eval_lines(eval_results, key), ""]
    lines += ["## Use", "", "```python"]
    if data.library_name == "peft":
        lines += ["from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")"]
    else:
        lines += ["from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(\"PATH\")"]
    body = "\n".join(lines + ["```", ""])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a card ({} when there is none)."""
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---\n", 1)[0]
    meta = yaml.safe_load(head)
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------- cards of finished runs


def stage_dirs(run_dir: Path) -> list[Path]:
    """The stage folders of a pipeline run, or the folder itself when it is a stage run."""
    if StageDir(run_dir).is_finished():
        return [Path(run_dir)]
    return [s.root for s in RunDir(run_dir).finished_stages()]


def card_for_stage(stage_dir: Path, eval_results: dict | None = None, base_repo: str | None = None,
                   merged: bool = False) -> str:
    """Rebuild a stage folder's card from what it wrote: config.yaml, run.json and data.json."""
    d = StageDir(stage_dir)
    cfg = config_from_dict(yaml.safe_load(d.config.read_text()) or {}, str(d.config))
    summary = json.loads(d.run.read_text())
    data = json.loads(d.data.read_text()) if d.data.is_file() else {}
    return model_card(cfg, summary, data, eval_results, model_name=summary.get("stage"), base_repo=base_repo,
                      merged=merged)


def run_eval(stage_dir: Path) -> dict | None:
    """The suite's eval.json of the run a stage folder belongs to, when it was evaluated."""
    path = RunDir(Path(stage_dir).parent).eval_json
    return json.loads(path.read_text()) if path.is_file() else None


def update_card(run_dir: str | Path, eval_results: dict | None = None) -> list[Path]:
    """Rewrite the README.md of every saved model (``best/``, ``final/``, and ``merged/``, the adapter
    merged into its base) in a pipeline or stage run, with the suite's results when given (the
    pipeline calls this after evaluation). Returns the cards.

    A stage folder reached through a symlink (a sweep's shared SFT stage) is written once per call."""
    written = []
    for stage in stage_dirs(Path(run_dir)):
        for sub in ("best", "final", "merged"):
            if (stage / sub).is_dir():
                card = card_for_stage(stage, eval_results, merged=sub == "merged")
                (stage / sub / "README.md").write_text(card, encoding="utf-8")
                written.append(stage / sub / "README.md")
    return written


def write_merged_card(adapter_folder: str | Path, out: str | Path) -> Path:
    """The card of ``preftune merge``'s output: the stage's card as a merged full model when the
    adapter comes from a run (with its evaluation when the run has one), else a short card naming
    the adapter's base."""
    adapter_folder, out = Path(adapter_folder), Path(out)
    stage = adapter_folder.parent
    if StageDir(stage).is_finished():
        text = card_for_stage(stage, run_eval(stage), merged=True)
    else:
        base = json.loads((adapter_folder / "adapter_config.json").read_text()).get("base_model_name_or_path", "")
        local = base.startswith(LOCAL_PREFIXES) or Path(base).exists()
        data = ModelCardData(base_model=None if local else base, library_name="transformers",
                             pipeline_tag="text-generation", tags=["preftune", "merged"])
        text = str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {out.name}\n\nThe LoRA adapter "
                             f"`{adapter_folder.name}` merged into its base `{Path(base).name if local else base}`.\n"))
    (out / "README.md").write_text(text, encoding="utf-8")
    return out / "README.md"
