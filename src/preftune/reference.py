"""The reference model is a strategy: a frozen ``copy``, the policy with its LoRA ``adapter`` disabled,
``precomputed`` log-probs cached on disk (keyed by model, tokenizer, template, truncation and data),
or ``none`` for reference-free losses. Each returns per-pair reference log-probs for a batch."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from preftune.env import cache_root
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")


class NoReference:
    name = "none"

    def logps(self, batch: dict) -> dict | None:
        return None


class ModelReference:
    """A frozen model (``copy``), or the policy itself with its adapters switched off (``adapter``)."""

    def __init__(self, module, name: str, disable_adapter=None):
        self.module, self.name, self.disable_adapter = module, name, disable_adapter

    def logps(self, batch: dict) -> dict:
        from preftune.methods import reference_logps_of

        with self.disable_adapter() if self.disable_adapter else nullcontext():
            return reference_logps_of(self.module, batch)


class PrecomputedReference:
    """Reference log-probs looked up by row key from a table computed once."""

    name = "precomputed"

    def __init__(self, table: dict[str, dict[str, float]], path: Path | None = None, computed: bool = False):
        self.table, self.path, self.computed = table, path, computed

    def logps(self, batch: dict) -> dict:
        try:
            rows = [self.table[k] for k in batch["keys"]]
        except KeyError as e:
            raise PreftuneError(f"reference cache {self.path} has no entry for row {e}; delete it to recompute") from None
        return {f: torch.tensor([r[f] for r in rows], dtype=torch.float32) for f in rows[0]}


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's content (vocabulary), not the folder it was loaded from."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def cache_key(model_path: str, tokenizer, data_cfg, precision: str, fingerprint: str) -> str:
    """Everything the reference log-probs depend on; beta, loss and learning rate are not in it."""
    from preftune.model import content_digest, resolve_model

    blob = {
        "model": content_digest(resolve_model(model_path)),
        "tokenizer": [tokenizer_fingerprint(tokenizer), tokenizer.eos_token_id],
        "template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "truncation": [data_cfg.max_length, data_cfg.max_prompt_length],
        "precision": precision,
        "data": fingerprint,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def precompute(module, batches, disable_adapter=None, progress: bool = True) -> dict[str, dict[str, float]]:
    """Run the reference once over ``batches`` (any layout) and return ``{row key: {field: value}}``."""
    from tqdm.auto import tqdm

    ref = ModelReference(module, "precompute", disable_adapter)
    table: dict[str, dict[str, float]] = {}
    for batch in tqdm(batches, desc="reference log-probs", disable=not progress, leave=False):
        out = ref.logps(batch)
        for i, key in enumerate(batch["keys"]):
            table[key] = {f: float(v[i]) for f, v in out.items()}
    return table


def load_or_precompute(key: str, compute, accelerator=None) -> PrecomputedReference:
    """The cached table under ``key``, computing it (on the main process) when absent."""
    path = cache_root() / "reference" / f"{key}.pt"
    computed = False
    is_main = accelerator is None or accelerator.is_main_process
    if not path.is_file() and is_main:
        table = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(table)}")
        torch.save(table, tmp)
        tmp.replace(path)
        computed = True
        log.info("reference log-probs computed for %d rows -> %s", len(table), path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not computed:
        log.info("reference log-probs reused from %s", path)
    return PrecomputedReference(torch.load(path, weights_only=False), path, computed)


def resolve_strategy(requested: str, needs_reference: bool, lora: bool, loss: str) -> str:
    """The strategy to use: ``none`` when the method needs no reference (``Method.needs_reference``),
    else ``requested``, with ``auto`` meaning precomputed (cached, reused across runs)."""
    if not needs_reference:
        return "none"
    if requested == "auto":
        return "precomputed"
    if requested == "adapter" and not lora:
        raise PreftuneError("dpo.reference=adapter needs lora.enabled=true")
    if requested == "none":
        raise PreftuneError(f"dpo.loss={loss} needs a reference model; set dpo.reference to auto/copy/adapter/precomputed")
    return requested
