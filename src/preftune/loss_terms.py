"""``dpo.loss`` resolved against the loss table: one LossTerm per loss with its parameters filled in
(the shared ``dpo.beta``, the older flat keys), and the options that depend on the losses checked.
The table itself is losses.py's; the schema is config/schema.py's."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any

from preftune.config.load import check_type
from preftune.config.schema import ConfigError, DataConfig, DPOConfig
from preftune.losses import LOSSES, NoParams, param_key


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
    weight = check_type(e.pop("weight", 1.0), float, f"{key}.weight", problems)
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
        kwargs[fields[k]] = check_type(v, hints[fields[k]], f"{key}.{k}", problems)
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


def terms(d: DPOConfig) -> list[LossTerm]:
    """``dpo.loss`` resolved: one LossTerm per loss, parameters filled in; a ConfigError if invalid.
    Memoised on the loss fields (the DPO step asks for every batch)."""
    key = repr([getattr(d, f) for f in ("loss", "loss_weights", "beta", *LEGACY_LOSS_KEYS, "sft_weight")])
    if key not in _RESOLVED:
        resolved, problems = resolve_loss(d)
        if problems:
            raise ConfigError(problems)
        _RESOLVED[key] = tuple(resolved)
    return list(_RESOLVED[key])


def loss_name(d: DPOConfig) -> str:
    """The loss names joined by ``+`` (``sigmoid``, ``sigmoid+sft``): run.json's ``method``."""
    return "+".join(t.name for t in terms(d))


def loss_beta(d: DPOConfig) -> float:
    """The ``beta`` of the first loss that takes one (run.json, the model card), else ``dpo.beta``."""
    return next((t.params.beta for t in terms(d) if hasattr(t.params, "beta")), d.beta)


def needs_reference(d: DPOConfig) -> bool:
    """Whether any of the losses needs reference log-probs."""
    return any(LOSSES[t.name].needs_reference for t in terms(d))


def unpaired(d: DPOConfig) -> bool:
    """Whether the losses read unpaired rows (KTO)."""
    return any(LOSSES[t.name].unpaired for t in terms(d))


def loss_problems(d: DPOConfig, data: DataConfig) -> list[str]:
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
