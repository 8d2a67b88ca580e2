"""The reference model is a strategy: a frozen ``copy``, the policy with its LoRA ``adapter`` disabled,
``precomputed`` log-probs cached on disk (keyed by model, tokenizer, template, truncation and data;
stored as safetensors, never pickle), or ``none`` for reference-free losses. Each returns per-pair
reference log-probs for a batch."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from preftune.data.tokenize import template_digest
from preftune.env import cache_root
from preftune.errors import PreftuneError
from preftune.files import disk_errors, remove_stale
from preftune.methods import reference_logps_of
from preftune.model import content_digest, resolve_model

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


def cache_key(model_path: str, tokenizer, data_cfg, precision: str, fingerprint: str, batching=None) -> str:
    """Everything the reference log-probs depend on; beta, loss and learning rate are not in it.
    ``batching`` (batch size, seed, layout: the micro-batches they were computed on) counts in bf16,
    where a row's log-probs move with its batch's shapes; in fp32 it is None and runs share the cache."""
    blob = {
        "model": content_digest(resolve_model(model_path)),
        "tokenizer": [tokenizer_fingerprint(tokenizer), tokenizer.eos_token_id],
        "template": template_digest(tokenizer),
        "truncation": [data_cfg.max_length, data_cfg.max_prompt_length],
        "precision": precision,
        "data": fingerprint,
        "fields": "sums, means, tails",  # what methods.reference_logps_of stores per row
    } | ({"batching": batching} if batching is not None else {})
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def precompute(module, batches, disable_adapter=None, progress: bool = True) -> dict[str, dict[str, float]]:
    """Run the reference once over ``batches`` (any layout) and return ``{row key: {field: value}}``."""
    ref = ModelReference(module, "precompute", disable_adapter)
    table: dict[str, dict[str, float]] = {}
    for batch in tqdm(batches, desc="reference log-probs", disable=not progress, leave=False):
        out = ref.logps(batch)
        for i, key in enumerate(batch["keys"]):
            table[key] = {f: float(v[i]) for f, v in out.items()}
    return table


def cache_path(key: str) -> Path:
    return cache_root() / "reference" / f"{key}.safetensors"


def write_table(path: Path, table: dict[str, dict[str, float]]) -> None:
    """The table as one safetensors file (one float64 column per field; row keys in its JSON
    metadata), written to a temporary name and renamed: never pickle, never half a file."""
    keys = list(table)
    fields = list(table[keys[0]]) if keys else []
    columns = {f: torch.tensor([table[k][f] for k in keys], dtype=torch.float64) for f in fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_errors(path):
            save_file(columns, tmp, metadata={"keys": json.dumps(keys), "fields": json.dumps(fields)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_table(path: Path) -> dict[str, dict[str, float]]:
    """What :func:`write_table` wrote; a damaged file is an error naming it and saying what to do."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys, fields = json.loads(meta["keys"]), json.loads(meta["fields"])
            columns = {name: f.get_tensor(name).tolist() for name in fields}
        if any(len(c) != len(keys) for c in columns.values()):
            raise ValueError("columns and row keys differ in length")
    except Exception as e:  # truncated, not safetensors, or not written by write_table
        raise PreftuneError(f"reference cache {path} is damaged or incomplete ({type(e).__name__}: {e}); "
                            "delete it to recompute") from None
    return {k: {name: columns[name][i] for name in fields} for i, k in enumerate(keys)}


def clean_stale_temps(folder: Path) -> None:
    """Remove temporary cache files left by killed writes (their process is gone)."""
    for p in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        remove_stale(p)


def load_or_precompute(key: str, compute, accelerator=None) -> PrecomputedReference:
    """The cached table under ``key``, computing it (on the main process) when absent."""
    path = cache_path(key)
    computed = False
    is_main = accelerator is None or accelerator.is_main_process
    if is_main:
        clean_stale_temps(path.parent)
    if not path.is_file() and is_main:
        table = compute()
        write_table(path, table)
        computed = True
        log.info("reference log-probs computed for %d rows -> %s", len(table), path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not computed:
        log.info("reference log-probs reused from %s", path)
    return PrecomputedReference(read_table(path), path, computed)


# ---------------------------------------------------------------- TR-DPO

REFERENCE_ADAPTER = "reference"
"""The frozen LoRA adapter that holds a synced reference under the ``adapter`` strategy."""


def sync_reference(reference, policy_model, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"), ``ref <- alpha * policy + (1 - alpha) * ref``
    (as TRL 1.16's SyncRefModelCallback), in place. ``copy``: on the frozen model's weights, with a LoRA
    policy's adapters merged into its effective weights. ``adapter``: the reference becomes the base plus
    a second, frozen LoRA adapter (created at the first sync as the policy's ``A`` with ``B = 0``, so the
    first update is exact) whose ``A`` and ``B`` are mixed factor by factor: exact for ``alpha = 1``,
    for ``alpha < 1`` a mixture of the factors rather than of their product ``BA``."""
    if getattr(reference, "name", None) == "copy":
        _mix_weights(reference.module.model, _effective_weights(policy_model), alpha)
    elif getattr(reference, "name", None) == "adapter":
        _mix_adapter(policy_model, alpha)
        reference.disable_adapter = lambda: _use_adapter(policy_model, REFERENCE_ADAPTER)
    else:
        raise PreftuneError("dpo.sync_ref_model needs dpo.reference copy or adapter; precomputed log-probs cannot be "
                            "updated during training")


@torch.no_grad()
def _effective_weights(model) -> dict[str, torch.Tensor]:
    """Parameter name (of the plain transformers model) -> the weight the model computes with: a LoRA
    layer's base weight plus its active adapters' delta."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, torch.Tensor] = {}
    for name, module in lm.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach().clone()
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
            out[f"{name}.weight"] = weight
    for name, param in lm.named_parameters():
        if "lora_" not in name:
            out.setdefault(name.replace(".base_layer", ""), param.detach())
    return out


@torch.no_grad()
def _mix_weights(frozen, weights: dict[str, torch.Tensor], alpha: float) -> None:
    for name, param in frozen.named_parameters():
        if name not in weights:
            raise PreftuneError(f"dpo.sync_ref_model: the policy has no weight {name!r} to sync the reference with")
        param.mul_(1 - alpha).add_(weights[name].to(param.dtype), alpha=alpha)


@torch.no_grad()
def _mix_adapter(model, alpha: float) -> None:
    active = model.active_adapter
    if REFERENCE_ADAPTER not in model.peft_config:
        config = copy.deepcopy(model.peft_config[active])
        config.lora_dropout = 0.0  # the reference is deterministic, in train mode too
        model.add_adapter(REFERENCE_ADAPTER, config)
        for name, param in model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                param.requires_grad_(False)
                source = dict(model.named_parameters())[name.replace(f".{REFERENCE_ADAPTER}.", f".{active}.")]
                param.copy_(source if "lora_A" in name else torch.zeros_like(source))
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{REFERENCE_ADAPTER}." in name:
            param.mul_(1 - alpha).add_(params[name.replace(f".{REFERENCE_ADAPTER}.", f".{active}.")], alpha=alpha)


@contextmanager
def _use_adapter(model, name: str):
    """Run ``model`` with adapter ``name`` active instead of its trained one (peft's ``set_adapter`` also
    switches which adapter trains, so it is switched back on the way out)."""
    active = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(active)


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
