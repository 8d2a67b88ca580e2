"""Preflight: checks a stage runs on its own first batch and model before its first optimizer step
(step-0 value, reference vs live, fast path vs plain path, template audit, truncation, ignored options).
Results go to the log and ``preflight.json`` (run.json and the model card read it); a failed check stops
the run. The loop is train.py's; the evaluation's own check (can a judge score the rows) is eval/suite.py's."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from preftune import loss_terms
from preftune.config import DPOConfig
from preftune.data import collate as collation
from preftune.data.stage import epoch_plan
from preftune.data.tokenize import _adds_bos, encode_prompt
from preftune.errors import PreftuneError
from preftune.losses import LOSSES
from preftune.methods import reference_logps_of, sequence_logps_of
from preftune.model import is_adapter
from preftune.reward import rewards_of

log = logging.getLogger("preftune")

STEP0_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3, "bf16-mixed": 1e-3}
"""Loss (nats) and rewards at step 0, where the policy is its reference: both sides are computed on the
same batch the same way, so only the arithmetic's rounding separates them."""
LOGPS_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "bf16-mixed": 5e-2}
"""Per-token mean log-prob (nats/token) between two computations of the same rows on different paths
(layouts, chunking), whose bf16 rounding differs with the batch's shapes (measured up to 0.03 on
SmolLM2-135M in pure bf16)."""
TRUNCATION_WARNING = 0.2
"""Share of prompts or completions cut by the limits above which the run warns."""


class PreflightError(PreftuneError):
    """A preflight check failed: the run stops before its first optimizer step."""


@dataclass
class Check:
    """One check's outcome: ``value`` against ``tolerance`` (None where it is a yes/no), and what it
    means (on failure: the likely cause and what to do)."""

    name: str
    ok: bool
    value: Any = None
    tolerance: Any = None
    detail: str = ""

    def record(self) -> dict:
        return {"ok": self.ok, "value": self.value, "tolerance": self.tolerance} | (
            {"detail": self.detail} if self.detail else {})


# ---------------------------------------------------------------- helpers


@contextmanager
def _as_training_computes(st):
    """Deterministic (dropout off), no gradient, and under the run's autocast, as its steps compute."""
    was_training = st.policy.training
    st.policy.eval()
    try:
        with torch.no_grad(), st.accelerator.autocast():
            yield
    finally:
        st.policy.train(was_training)


def first_items(st) -> list:
    """This rank's first micro-batch of step 0 (item objects), as the loop will build it."""
    plan = epoch_plan(st.bins, len(st.data.train), st.stage_cfg.batch_size, st.cfg.seed, 0)
    return [st.data.train[j] for j in plan[st.accelerator.process_index % len(plan)]]


def _plain_collate(st, items: list) -> dict:
    """The padded layout of the same items: the path every fast layout must agree with."""
    pad = st.tokenizer.pad_token_id
    if st.method.data == "sft":
        return collation.collate_sft(items, pad, completion_only=getattr(st.stage_cfg, "completion_only", True))
    if hasattr(items[0], "label"):  # unpaired (KTO) rows
        return collation.collate_unpaired(items, pad, collation.collate_padded)
    return collation.collate_padded(items, pad)


def _disable_adapter(st):
    return getattr(st.model, "disable_adapter", None) if st.cfg.lora.enabled else None


def _mean_gap(a: dict, b: dict) -> tuple[float, int]:
    """Largest per-token mean gap between two reference dicts over chosen and rejected -> (gap, row)."""
    gaps = torch.stack([(a[f].float().cpu() - b[f].float().cpu()).abs() for f in ("chosen_mean", "rejected_mean")])
    worst = gaps.max(dim=0).values
    return float(worst.max()), int(worst.argmax())


# ---------------------------------------------------------------- the checks


def live_reference(st, batch: dict) -> dict | None:
    """Reference log-probs computed now, as the run's reference would be if it were live: the policy
    with its adapters off (before the first update, the model as it came in). None without a reference."""
    if st.ref_strategy == "none":
        return None
    disable = _disable_adapter(st)
    with _as_training_computes(st), disable() if disable else nullcontext():
        return reference_logps_of(st.policy, batch, st.stage_cfg.chunked_logps)


def check_step0(st, batch: dict, live: dict | None) -> Check:
    """With the policy equal to its reference, the loss takes its table value (the loss of a zero
    margin: ln 2 for sigmoid) and every reward is 0. ``live``: :func:`live_reference` of the batch, the
    policy's own log-probs at step 0."""
    tol = STEP0_TOLERANCE[st.cfg.precision]
    if st.method.data != "preference" or not st.method.needs_reference(st.stage_cfg):
        return Check("step0", True, None, tol, "no reference: the loss has no known step-0 value")
    if is_adapter(st.model_path) and st.ref_strategy in ("adapter", "precomputed"):  # adapters off: its base
        return Check("step0", True, None, tol, "the reference is the adapter's base, not the starting policy")
    with _as_training_computes(st):
        loss, metrics = st.method.step(st.policy, batch, st.stage_cfg, st.reference.logps(batch))
        expected, _ = st.method.step(st.policy, batch, st.stage_cfg, live)
    loss, expected = float(loss), float(expected)
    reward = max(abs(float(metrics.get(k, 0.0))) for k in ("rewards/chosen", "rewards/rejected"))
    ok = abs(loss - expected) <= tol and reward <= tol
    if not math.isfinite(loss):
        return Check("step0", False, loss, tol, f"the step-0 loss is {loss} before any update: check the data "
                     "(empty rows), the precision (compare with fp32) and the loss's parameters")
    detail = "" if ok else (
        f"step-0 loss {loss:.6f} vs {expected:.6f} (the loss with the policy as its own reference), largest "
        f"|reward| {reward:.3g}: the reference ({st.ref_strategy}) does not compute what the policy computes "
        "(a stale reference cache, a reference under another precision or batch path, or another model)")
    return Check("step0", ok, round(loss, 6), tol, detail)


def check_reference(st, batch: dict, live: dict | None) -> Check:
    """The configured reference (a cache, a frozen copy, disabled adapters) equals a live computation
    on the same rows: the policy with its adapters off, as it is before the first update."""
    tol = STEP0_TOLERANCE[st.cfg.precision] * 10
    if st.ref_strategy == "none":
        return Check("reference", True, None, tol, "no reference")
    with _as_training_computes(st):
        used = st.reference.logps(batch)
    gap, row = _mean_gap(used, live)
    if gap <= tol:
        return Check("reference", True, round(gap, 8), tol)
    where = f"reference cache {st.reference.path}" if getattr(st.reference, "path", None) else st.ref_strategy
    key = batch["keys"][row] if "keys" in batch else row
    return Check("reference", False, round(gap, 8), tol,
                 f"{where} differs from a live computation on row {key}: per-token mean log-prob "
                 f"{float(used['chosen_mean'][row]):.5f} vs {float(live['chosen_mean'][row]):.5f} (chosen). The cache "
                 "key covers the model's files, tokenizer, chat template, limits (max_length, max_prompt_length), "
                 "precision and rows, so something outside them changed: delete the cache file to recompute it")


LAYOUT_ROWS = 2
"""Rows of the first micro-batch the layout check compares: the plain path's full ``[R, T, V]`` logits
cost most of the preflight, and two rows already share, pack and chunk."""


def check_layout(st, items: list) -> Check:
    """The run's layout and log-prob path (prefix-shared, packed, chunked) give the same per-sequence
    log-probs, over the same scored tokens, as the padded, unchunked path, on the first rows of the
    first micro-batch."""
    tol = LOGPS_TOLERANCE[st.cfg.precision]
    items = items[:LAYOUT_ROWS]
    chunked = st.stage_cfg.chunked_logps
    if st.layout == "padded" and not chunked:
        return Check("layout", True, None, tol, "the run takes the plain path")
    fast_batch, plain_batch = st.collate(items), _plain_collate(st, items)
    if st.method.model == "reward":  # a reward model: the rewards, read at each completion's last token
        with _as_training_computes(st):
            gap = float((rewards_of(st.policy, fast_batch).float() - rewards_of(st.policy, plain_batch).float()).abs().max())
        return Check("layout", gap <= tol, round(gap, 8), tol, "" if gap <= tol else (
            f"layout {st.layout} gives rewards {gap:.3g} from the padded layout's; set rm.layout=padded and report the bug"))
    with _as_training_computes(st):
        fast = sequence_logps_of(st.policy, fast_batch, chunked)
        plain = sequence_logps_of(st.policy, plain_batch, False)
    path = f"layout {st.layout}" + (", chunked log-probs" if chunked else "")
    if not torch.equal(fast[1].cpu(), plain[1].cpu()):
        bad = int((fast[1].cpu() != plain[1].cpu()).nonzero()[0])
        return Check("layout", False, f"{int(fast[1][bad])} vs {int(plain[1][bad])} scored tokens", 0,
                     f"{path} scores other tokens than the padded path (sequence {bad}): its masks or score "
                     "positions are off; set layout=padded and report the bug")
    gap = float((fast[2].float().cpu() - plain[2].float().cpu()).abs().max())
    ok = gap <= tol
    return Check("layout", ok, round(gap, 8), tol, "" if ok else (
        f"{path} gives per-token log-probs {gap:.3g} from the padded, unchunked path's: its attention mask lets a "
        "sequence see what it must not (or hides what it must see); set layout=padded and report the bug"))


def _doubled_specials(ids: list[int], special: set[int]) -> list[int]:
    return sorted({a for a, b in zip(ids, ids[1:]) if a == b and a in special})


def check_template(st, items: list) -> Check:
    """One BOS where the tokenizer wants one, no special token doubled at a join, each uncut completion
    ending with EOS, and a system prompt rendered once."""
    tok, problems = st.tokenizer, []
    special = set(tok.all_special_ids)
    names = lambda ids: ", ".join(tok.convert_ids_to_tokens(ids))  # noqa: E731
    probe = [{"role": "system", "content": "PREFLIGHT-SYSTEM"}, {"role": "user", "content": "PREFLIGHT-USER"}]
    try:
        ids = encode_prompt(probe, tok)
    except Exception as e:  # a template that takes no system turn
        ids = None
        log.debug("preflight: the template renders no system turn (%s)", e)
    if ids is not None and tok.decode(ids).count("PREFLIGHT-SYSTEM") != 1:
        problems.append(f"the system prompt is rendered {tok.decode(ids).count('PREFLIGHT-SYSTEM')} times")
    if ids is not None and (doubled := _doubled_specials(ids, special)):  # rows' prompts may be cut at the front
        problems.append(f"the chat template renders special token {names(doubled)} doubled")
    eos = tok.eos_token_id
    for it in items:
        completions = [it.chosen_ids, it.rejected_ids] if hasattr(it, "chosen_ids") else [it.completion_ids]
        if _adds_bos(tok) and it.prompt_ids[:1] != [tok.bos_token_id]:
            problems.append(f"row {it.key}: the prompt does not start with BOS, which this tokenizer adds")
        for c in completions:
            if doubled := _doubled_specials(it.prompt_ids + c, special):
                problems.append(f"row {it.key}: special token {names(doubled)} doubled (at a join)")
            if not it.truncated and c[-1:] != [eos]:
                problems.append(f"row {it.key}: a completion ends with {names(c[-1:])}, not EOS {tok.eos_token}")
    problems = list(dict.fromkeys(problems))
    return Check("template", not problems, len(problems), 0,
                 "; ".join(problems[:3]) + ("; fix the chat template or the tokenizer's special tokens" if problems else ""))


def check_truncation(st) -> Check:
    """What share of prompts and completions the limits cut (a warning above ``TRUNCATION_WARNING``),
    and an error when a completion keeps no scored token."""
    for it in st.data.train + st.data.test:
        completions = [it.chosen_ids, it.rejected_ids] if hasattr(it, "chosen_ids") else [it.completion_ids]
        if any(len(c) - (0 if it.prompt_ids else 1) < 1 for c in completions):
            return Check("truncation", False, "a completion of 0 tokens", ">= 1",
                         f"row {it.key}: a completion keeps no scored token after truncation, so it trains on "
                         "nothing; raise data.max_length or lower data.max_prompt_length")
    counts = st.data.report.get("tokenize", st.data.report.get("tokenize_train", {}))
    kept = max(1, counts.get("kept", 0))
    cut = {part: n / kept for part, n in counts.get("truncated", {}).items()}
    high = {p: f for p, f in cut.items() if f > TRUNCATION_WARNING}
    value = {p: round(f, 4) for p, f in cut.items()}
    detail = "; ".join(f"{f:.0%} of {p}s are cut by the limits" for p, f in high.items())
    return Check("truncation", True, value, TRUNCATION_WARNING,
                 detail + ("; raise data.max_length / data.max_prompt_length to keep them" if high else ""))


def _changed(section, key: str) -> bool:
    """Whether ``key`` of a config section differs from its default (the user set it)."""
    return getattr(section, key) != getattr(type(section)(), key)


def ignored_options(st) -> tuple[list[str], list[str]]:
    """Configured options that the path this run took does not read, each with why -> (those of the
    stage's own section, which stop the run; those elsewhere, which it only names: a shared config's
    LoRA settings may serve another run)."""
    cfg, s, own, other = st.cfg, st.stage_cfg, [], []
    if not (cfg.lora.enabled or is_adapter(st.model_path)):
        other += [f"lora.{k}: LoRA is off (lora.enabled=false)" for k in ("r", "alpha", "dropout", "target_modules")
                  if _changed(cfg.lora, k)]
    if not st.data.test:
        own += [f"{st.name}.{k}: the stage has no held-out rows to evaluate" for k in ("eval_every", "early_stopping")
                if _changed(s, k)]
    if not isinstance(s, DPOConfig):
        return own, other
    if st.ref_strategy == "none" and _changed(s, "reference"):
        own.append(f"{st.name}.reference={s.reference}: the loss ({loss_terms.loss_name(s)}) uses no reference model")
    if not s.sync_ref_model:
        own += [f"{st.name}.{k}: TR-DPO is off ({st.name}.sync_ref_model=false)"
                for k in ("ref_model_sync_steps", "ref_model_mixup_alpha") if _changed(s, k)]
    if s.ld_alpha is not None and all(LOSSES[t.name].reads == "means" for t in loss_terms.terms(s)):
        own.append(f"{st.name}.ld_alpha: LD-DPO reweights summed log-probs, and every loss term here reads "
                   "per-token means")
    return own, other


def check_ignored(st) -> Check:
    """Every option the user set is read by the path the run took, or the check names it and why."""
    own, other = ignored_options(st)
    detail = "; ".join(own + other)
    if own:
        detail += ": remove these settings (or change what makes the run ignore them)"
    return Check("ignored_options", not own, own + other, [], detail)


# ---------------------------------------------------------------- running them


CHECKS = ("truncation", "template", "ignored_options", "reference", "step0", "layout")
"""In the order they run: the data's checks first (a model check on broken rows would only repeat
them), then the reference before step 0's value (the cause before its symptom)."""


def run_checks(st) -> list[Check]:
    """Every check on the stage's first micro-batch of step 0, in ``CHECKS`` order; the model's checks
    only when the data's passed."""
    items = first_items(st)
    checks = [check_truncation(st), check_template(st, items), check_ignored(st)]
    if not all(c.ok for c in checks):
        return checks
    batch = st.collate(items)
    live = live_reference(st, batch)
    return checks + [check_reference(st, batch, live), check_step0(st, batch, live), check_layout(st, items)]


def record(checks: list[Check]) -> dict:
    """``{check: {ok, value, tolerance[, detail]}}`` as run.json holds it."""
    return {c.name: c.record() for c in checks}


def _log(checks: list[Check]) -> None:
    for c in checks:
        (log.info if c.ok and (not c.detail or c.value is None) else log.warning if c.ok else log.error)(
            "preflight %s: %s (value %s, tolerance %s)%s", c.name, "ok" if c.ok else "FAILED", c.value,
            c.tolerance, f": {c.detail}" if c.detail else "")


def run(st, enabled: bool | None = True) -> dict:
    """The preflight of a fresh stage, before its first optimizer step: log each check, write
    ``preflight.json`` and stop the run (a ``PreflightError`` naming every failed check) if one failed.
    ``enabled=False`` (``--no-preflight``) records that it was skipped; None leaves them to the caller
    (``preftune check`` runs them itself, to print every outcome)."""
    if enabled is None:
        return {}
    checks: list[Check] = []
    if not enabled:
        result = {"skipped": "--no-preflight"}
        if st.main:
            log.info("preflight skipped (--no-preflight)")
    else:
        t0 = time.perf_counter()
        checks = run_checks(st)
        result = record(checks) | {"seconds": round(time.perf_counter() - t0, 2)}
        if st.main:
            _log(checks)
    if st.main:
        st.out.root.mkdir(parents=True, exist_ok=True)
        st.out.preflight.write_text(json.dumps(result, indent=1))
    failed = [c for c in checks if not c.ok]
    failed_anywhere = st.accelerator.reduce(torch.tensor(float(len(failed)), device=st.accelerator.device), "sum")
    if failed or float(failed_anywhere) > 0:
        failed = failed or [Check("preflight", False, detail="a check failed on another rank")]
        lines = "\n".join(f"  - {c.name}: value {c.value}, tolerance {c.tolerance}: {c.detail}" for c in failed)
        raise PreflightError(f"preflight check{'s' if len(failed) > 1 else ''} "
                             f"{', '.join(repr(c.name) for c in failed)} failed:\n{lines}\nThe run stopped before "
                             f"its first step ({st.out.preflight} has every check); --no-preflight skips them")
    return result


def recorded(folder) -> dict | None:
    """What :func:`run` wrote for a stage folder (a ``paths.StageDir``), or None."""
    try:
        return json.loads(folder.preflight.read_text())
    except (OSError, ValueError):
        return None
