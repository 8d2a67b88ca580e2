"""Model cards: the ``README.md`` (YAML front matter + Markdown, as the Hugging Face Hub shows it)
written beside every saved model or adapter, refreshed with evaluation results after the suite
runs, and ``preftune push`` which uploads a run's model with its card through huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from preftune import embedded
from preftune.config import Config, config_from_dict
from preftune.errors import PreftuneError
from preftune.eval.tasks import mean_accuracy

HUB_IDS = {embedded.SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""preftune's model names -> the Hub id a card's ``base_model`` should name."""
LICENSES = {embedded.SMOLLM2: "apache-2.0"}
"""Known licenses of the models preftune ships."""
METHOD_TAGS = {"sft": "sft", "sigmoid": "dpo", "ipo": "dpo", "hinge": "dpo", "robust": "dpo",
               "orpo": "orpo", "simpo": "simpo"}
"""Stage method (``run.json``'s ``method``) -> the Hub tag of its family."""
METHOD_NAMES = {"sft": "supervised fine-tuning (SFT)", "dpo": "Direct Preference Optimization (DPO)",
                "orpo": "ORPO (odds-ratio preference optimization, no reference model)",
                "simpo": "SimPO (reference-free, length-normalised rewards)"}
LOCAL_PREFIXES = ("embedded:", "tiny", "/", ".", "~")


# ---------------------------------------------------------------- the card


def _license(cfg: Config) -> str | None:
    """The base model's license: known for the shipped model, else from its own card's metadata."""
    if cfg.model in LICENSES:
        return LICENSES[cfg.model]
    readme = Path(cfg.model).expanduser() / "README.md"
    meta = front_matter(readme.read_text()) if readme.is_file() else {}
    return meta.get("license") if isinstance(meta.get("license"), str) else None


def _hub_dataset(source: str) -> str | None:
    """A Hub dataset id for the card's ``datasets`` field, or None for local and embedded data."""
    return None if source.startswith(LOCAL_PREFIXES) or Path(source).exists() else source


def metadata(cfg: Config, summary: dict) -> dict:
    """The card's YAML front matter."""
    tag = METHOD_TAGS.get(str(summary.get("method")), "dpo")
    lora = bool(summary.get("lora", cfg.lora.enabled))
    meta: dict = {
        "base_model": HUB_IDS.get(cfg.model, cfg.model),
        "library_name": "peft" if lora else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["preftune", tag] + (["lora"] if lora else []),
    }
    sources = [cfg.data.source] + ([cfg.sft.data.source] if cfg.sft.data is not None else [])
    hub = [d for s in dict.fromkeys(sources) if (d := _hub_dataset(s))]
    if hub:
        meta["datasets"] = hub
    if lic := _license(cfg):
        meta["license"] = lic
    return meta


def _fmt(x, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _method_lines(cfg: Config, summary: dict) -> list[str]:
    method = str(summary.get("method") or "sft")
    family = METHOD_TAGS.get(method, method)
    lines = [f"- **Method:** {METHOD_NAMES.get(family, family)}"]
    if summary.get("stage") != "sft":
        lines.append(f"- **Loss:** `{method}`, **beta** {summary.get('beta', cfg.dpo.beta):g}")
        lines.append(f"- **Reference:** {summary.get('reference', cfg.dpo.reference)}")
    if summary.get("base_model"):
        lines.append(f"- **Trained from:** `{summary['base_model']}`")
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
    ]


def _eval_row(name: str, e: dict) -> str:
    rw, w, h, t = e.get("rewards", {}), e.get("winrate", {}), e.get("heldout", {}), e.get("tasks", {})
    acc = rw.get("rewards/accuracies")
    wr = (f"{_fmt(w['winrate'], '.3f')} [{_fmt(w.get('ci_low'), '.2f')}, {_fmt(w.get('ci_high'), '.2f')}]"
          if "winrate" in w else "-")
    d = h.get("diff_vs_base")
    return " | ".join([
        name, f"{_fmt(acc, '.3f')} ± {_fmt(rw.get('se'), '.3f')}" if acc is not None else "-", wr,
        _fmt(h.get("bpb")), f"{d['mean']:+.4f}" if d else "-", _fmt(mean_accuracy(t), ".3f")])


def _eval_lines(eval_results: dict, model_name: str | None) -> list[str]:
    models = eval_results.get("models", eval_results)
    names = [n for n in ("base", model_name) if n and n in models] or list(models)
    lines = ["| model | reward acc (± se) | win-rate vs chosen [95% CI] | bits/byte | Δ bits/byte vs base | task acc |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {_eval_row(n, models[n])} |" for n in names]


def model_card(cfg: Config, summary: dict, data_report: dict, eval_results: dict | None = None,
               model_name: str | None = None) -> str:
    """The README.md of a saved model: Hub metadata, then method, data, training and evaluation.

    ``summary`` is the stage's ``run.json``; ``data_report`` the read/tokenize reports of its
    ``data.json``; ``eval_results`` the suite's ``eval.json`` (its ``model_name`` entry and the base)."""
    stage = summary.get("stage", "dpo")
    name = Path(cfg.output_dir).name or "model"
    lines = ["---", yaml.safe_dump(metadata(cfg, summary), sort_keys=False).rstrip(), "---", "",
             f"# {name} ({stage})", "",
             f"Trained with preftune from `{HUB_IDS.get(cfg.model, cfg.model)}`.",
             "", "## Method", "", *_method_lines(cfg, summary), "", "## Data", "", *_data_lines(cfg, summary, data_report),
             "", "## Training", "", *_training_lines(summary), ""]
    if eval_results:
        lines += ["## Evaluation", "", *_eval_lines(eval_results, model_name or stage), ""]
    lines += ["## Use", "", "```python"]
    if cfg.lora.enabled:
        lines += ["from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")"]
    else:
        lines += ["from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(\"PATH\")"]
    return "\n".join(lines + ["```", ""])


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
    run_dir = Path(run_dir)
    if (run_dir / "run.json").is_file():
        return [run_dir]
    return [run_dir / s for s in ("sft", "dpo") if (run_dir / s / "run.json").is_file()]


def card_for_stage(stage_dir: Path, eval_results: dict | None = None) -> str:
    """Rebuild a stage folder's card from what it wrote: config.yaml, run.json and data.json."""
    stage_dir = Path(stage_dir)
    cfg = config_from_dict(yaml.safe_load((stage_dir / "config.yaml").read_text()) or {}, str(stage_dir / "config.yaml"))
    summary = json.loads((stage_dir / "run.json").read_text())
    data = json.loads((stage_dir / "data.json").read_text()) if (stage_dir / "data.json").is_file() else {}
    return model_card(cfg, summary, data, eval_results, model_name=summary.get("stage"))


def update_card(run_dir: str | Path, eval_results: dict | None = None) -> list[Path]:
    """Rewrite the README.md of every saved model (``best/``, ``final/``) in a pipeline or stage run,
    with the suite's results when given (the pipeline calls this after evaluation). Returns the cards.

    A stage folder reached through a symlink (a sweep's shared SFT stage) is written once per call."""
    written = []
    for stage in stage_dirs(Path(run_dir)):
        card = card_for_stage(stage, eval_results)
        for sub in ("best", "final"):
            if (stage / sub).is_dir():
                (stage / sub / "README.md").write_text(card, encoding="utf-8")
                written.append(stage / sub / "README.md")
    return written


# ---------------------------------------------------------------- push


def upload_folder_of(run: Path) -> Path:
    """What ``push`` uploads: a pipeline run's last stage, a stage run's ``best/`` (else ``final/``),
    or a model folder as is."""
    from preftune.model import resolve_run

    if not run.exists():
        raise PreftuneError(f"push: run folder not found: {run}")
    folder = resolve_run(run)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise PreftuneError(f"push: {folder} holds no model (no config.json or adapter_config.json); "
                            "pass a finished run folder or a saved model folder")
    return folder


def _ensure_card(folder: Path) -> None:
    """Write the card into the model folder if it has none (``best/`` is saved without one)."""
    stage = folder.parent
    if (folder / "README.md").is_file() or not (stage / "run.json").is_file():
        return
    ev_path = stage.parent / "eval" / "eval.json"
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    (folder / "README.md").write_text(card_for_stage(stage, ev), encoding="utf-8")


def push(ns) -> int:
    """``preftune push RUN --repo NAME``: create the Hub repo and upload the model with its card."""
    from preftune.model import offline

    folder = upload_folder_of(Path(ns.run))
    if offline():
        raise PreftuneError(f"push: HF_HUB_OFFLINE=1 is set, so {folder} cannot be uploaded to {ns.repo!r}; "
                            "unset HF_HUB_OFFLINE, log in (`hf auth login`), and run `preftune push` again")
    from huggingface_hub import HfApi

    _ensure_card(folder)
    api = HfApi()
    url = api.create_repo(ns.repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=ns.repo, commit_message=f"preftune push of {folder}")
    print(f"pushed {folder} -> {url}")
    return 0
