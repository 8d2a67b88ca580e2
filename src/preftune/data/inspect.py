"""``preftune data inspect TARGET``: read and tokenize a dataset exactly as training would, then print
what was kept and dropped (by reason, against ``data.max_drop_fraction``), token-length percentiles
before and after truncation, prompt and completion truncation, boundary merges and one rendered
sample with the masked prompt visible. KTO (unpaired) data is recognised and its labels counted.
Reads only; trains nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from preftune import embedded
from preftune.config import Config, DataConfig
from preftune.config.validate import load_config
from preftune.data import drops
from preftune.data.prepare import tokenize_splits
from preftune.data.sources import detect_kind, load_rows
from preftune.data.tokenize import use_chat_template
from preftune.model import load_tokenizer, resolve_model

CONFIG_SUFFIXES = (".yaml", ".yml")
SAMPLE_CHARS = 1500


def _is_config(target: str) -> bool:
    return Path(target).suffix.lower() in CONFIG_SUFFIXES


def resolve(target: str, overrides: list[str], fmt: str | None, sft: bool) -> tuple[Config, DataConfig]:
    """The config and the DataConfig to inspect: a config file's data (``sft.data`` with --sft when
    set), or defaults with ``data.source=TARGET`` for a data file, folder or dataset name."""
    if _is_config(target):
        cfg = load_config(target, overrides)
        data = cfg.sft.data if sft and cfg.sft.data is not None else cfg.data
    else:
        cfg = load_config(None, overrides)
        cfg.data.source = target
        data = cfg.data
    if fmt:
        data.format = fmt
    return cfg, data


def load_tokenizer_for(cfg: Config):
    """The tokenizer training would use: ``cfg.tokenizer`` or the model's; embedded and tiny models
    share the SmolLM2 tokenizer (no model conversion needed)."""
    name = cfg.tokenizer or cfg.model
    if name.startswith(("embedded:", "tiny")):
        tok = AutoTokenizer.from_pretrained(embedded.tokenizer_dir())
        use_chat_template(tok, cfg.data.chat_template)
        return tok
    return load_tokenizer(resolve_model(name, cfg.model_revision if name == cfg.model else None),
                          chat_template=cfg.data.chat_template)


def _show(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS // 2] + " [...] " + text[-SAMPLE_CHARS // 2:]


def sample_view(item, tokenizer) -> dict[str, Any]:
    """One tokenized row decoded part by part (the prompt is masked out of the loss)."""
    completions = {"chosen": item.chosen_ids, "rejected": item.rejected_ids} if hasattr(item, "chosen_ids") \
        else {"completion": item.completion_ids}
    view = {"key": item.key, "truncated": item.truncated, "prompt_tokens": len(item.prompt_ids),
            "prompt": _show(tokenizer, item.prompt_ids)}
    for name, ids in completions.items():
        view[name] = _show(tokenizer, ids)
        view[f"{name}_tokens"] = len(ids)
    return view


def summarize(data: DataConfig, kind: str, read, report: dict[str, Any], splits: dict[str, int],
              sample: dict | None, labels: dict[str, int] | None = None) -> dict[str, Any]:
    """The inspect result as one JSON-able dict: ``rows_read == rows_kept + sum(dropped)``;
    ``truncated`` is ``{prompt: N, completion: N}`` over the kept rows. ``report`` is
    :func:`~preftune.data.prepare.tokenize_splits`'s."""
    tok, account = report["tokenize"], report["drops"]
    return {
        "source": data.source, "format": read.format, "kind": kind,
        "rows_read": account["rows_read"], "rows_kept": account["rows_kept"], "dropped": account["dropped"],
        "bad_fraction": account["bad_fraction"], "max_drop_fraction": data.max_drop_fraction,
        "over_max_drop_fraction": drops.over_limit(account, data.max_drop_fraction), "notes": read.notes,
        "splits": splits, "labels": labels,
        "lengths": tok["lengths"], "lengths_before_truncation": tok["lengths_before_truncation"],
        "truncated": tok["truncated"], "truncation_rate": tok["truncation_rate"],
        "boundary_merges": tok["boundary_merges"],
        "max_length": data.max_length, "max_prompt_length": data.max_prompt_length, "sample": sample,
    }


def _render_sample(sample: dict) -> list[str]:
    """The prompt once, in ``[MASKED ...]`` (no loss there), then ``|`` and each trained completion."""
    names = [n for n in ("chosen", "rejected", "completion") if n in sample]
    first, *rest = names
    lines = [f"sample (key {sample['key']}{', truncated' if sample['truncated'] else ''}): "
             f"{sample['prompt_tokens']} prompt tokens masked; '|' marks where the trained tokens start",
             f"--- {first} ({sample[first + '_tokens']} trained tokens):",
             f"[MASKED {sample['prompt']}]|{sample[first]}"]
    for name in rest:
        lines += [f"--- {name} ({sample[name + '_tokens']} trained tokens) after the same masked prompt:",
                  f"|{sample[name]}"]
    return lines


def _length_table(title: str, lengths: dict[str, dict[str, int]]) -> list[str]:
    lines = [f"{title:<13}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    for part, st in lengths.items():
        lines.append(f"  {part:<11}" + "".join(f"{st[k]:>8}" for k in ("p50", "p90", "p99", "max")))
    return lines


def render_text(s: dict[str, Any]) -> str:
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items())) or "none"
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    lines = [
        f"source: {s['source']} (format: {s['format']}, kind: {s['kind']})",
        f"rows read: {s['rows_read']}  kept: {s['rows_kept']} ({splits})",
        f"dropped: {dropped}",
        f"bad or malformed: {100 * s['bad_fraction']:.1f}% of rows read (data.max_drop_fraction "
        f"{s['max_drop_fraction']}{'; training would STOP' if s['over_max_drop_fraction'] else ''})",
    ]
    lines += [f"note: {n}" for n in s["notes"]]
    if s["labels"]:
        lines.append(f"labels: {s['labels']['desirable']} desirable, {s['labels']['undesirable']} undesirable")
    lines += _length_table("token lengths", s["lengths"])
    lines += _length_table("untruncated", s["lengths_before_truncation"])
    t, r = s["truncated"], s["truncation_rate"]
    lines.append(f"truncated: {t['prompt']} of {s['rows_kept']} prompts ({100 * r['prompt']:.1f}%) cut to "
                 f"max_prompt_length={s['max_prompt_length']}; {t['completion']} rows ({100 * r['completion']:.1f}%) "
                 f"with a completion cut to fit max_length={s['max_length']}")
    lines.append(f"boundary merges (prompt/completion BPE merge, counted and kept): {s['boundary_merges']}")
    if s["sample"]:
        lines += _render_sample(s["sample"])
    return "\n".join(lines)


def inspect(cfg: Config, data: DataConfig, kind: str, tokenizer) -> dict[str, Any]:
    kind = detect_kind(data, kind)
    train_rows, heldout_rows, read = load_rows(data, kind, cfg.seed)
    labels = None
    if kind == "unpaired":
        desirable = sum(r.label for r in train_rows + heldout_rows)
        labels = {"desirable": desirable, "undesirable": len(train_rows) + len(heldout_rows) - desirable}
    tok_kind = "preference" if kind == "preference" else "sft"  # unpaired rows tokenize as prompt + completion
    train, heldout, report = tokenize_splits(train_rows, heldout_rows, read, tokenizer, data, tok_kind, check=False)
    sample = sample_view((train or heldout)[0], tokenizer) if train or heldout else None
    return summarize(data, kind, read, report, {"train": len(train), "heldout": len(heldout)}, sample, labels)

