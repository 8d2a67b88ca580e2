"""The evaluation suite: reward accuracy, judged win-rate against chosen, held-out loss (forgetting)
and downstream tasks for one or more models (and the first two, with checked accuracy, on every
``eval.datasets`` entry), written to ``eval.json`` (``preftune eval``), and the
single-evaluation subcommands. Generations, held-out losses and task scores are cached on disk,
keyed by the model's files and the settings, so a base model is evaluated once across runs and sweeps.
The measurements themselves live in generate.py, judges.py, heldout.py, tasks.py and train.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from preftune.config import Config, to_dict
from preftune.data.rows import PreferenceRow
from preftune.data.sources import load_rows
from preftune.env import cache_root
from preftune.errors import MissingExtraError, PreftuneError
from preftune.eval import engines
from preftune.eval import generate as generation
from preftune.eval import heldout as heldout_lm
from preftune.eval.checks import check
from preftune.eval.engines import Sampling
from preftune.eval.judges import judge_pairs, make_judge
from preftune.eval.kl import rewards_and_kl, token_kl
from preftune.eval.prompts import draws_hh_categories, hh_category_rows
from preftune.eval.rewards import evaluate_rewards
from preftune.eval.stats import paired_bootstrap, wilson_interval
from preftune.eval.tasks import run_tasks
from preftune.files import write_json
from preftune.methods import METHODS
from preftune.model import (
    adapter_base,
    content_digest,
    is_adapter,
    load_for_inference,
    resolve_model,
    trust_options,
)
from preftune.paths import EvalDir

PUBLIC_HELDOUT = ("nll", "ppl", "bpb", "n_tokens", "n_bytes", "n_chunks", "chunk_length")


# ---------------------------------------------------------------- the on-disk cache


def cache_dir() -> Path:
    """``<preftune cache>/eval`` (``$PREFTUNE_CACHE`` moves it, e.g. per sweep or per test)."""
    return cache_root() / "eval"


def model_fingerprint(name: str) -> dict:
    """What identifies a model for the cache: the content of its files (an adapter's base included),
    so a retrained folder never reuses stale results and identical weights saved twice (``best/`` and
    the snapshot of the same step) are evaluated once."""
    return {"content": content_digest(resolve_model(name))}


def _cache_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cache_dir() / kind / f"{digest}.json"


def _cached_value(kind: str, key: dict):
    """The value stored for ``key``, or None (absent, or a torn file)."""
    path = _cache_path(kind, key)
    if path.is_file():
        try:
            return json.loads(path.read_text())["value"]
        except (ValueError, KeyError):
            pass
    return None


def cached(kind: str, key: dict, compute: Callable[[], dict | list], about: str | None = None):
    """``compute()``, memoised as JSON under ``cache_dir()/kind/<sha256 of key>.json`` (written
    atomically; a torn file is recomputed); ``about`` (the model's folder) is stored beside the key for
    people, not matched."""
    value = _cached_value(kind, key)
    if value is not None:
        return value
    value = compute()
    write_json(_cache_path(kind, key), {"key": key, "about": about, "value": value})
    return value


# ---------------------------------------------------------------- inputs


def heldout_rows(cfg: Config) -> list[PreferenceRow]:
    """The held-out preference rows of ``cfg.data`` (split or carved off with the seed)."""
    _, test, _ = load_rows(cfg.data, "preference", cfg.seed)
    if not test:
        raise PreftuneError(f"no held-out rows in {cfg.data.source}; set data.test_split or data.test_size")
    return test


def category_of(row: PreferenceRow) -> str:
    meta = row.meta or {}
    return str(meta.get("category") or meta.get("subset") or meta.get("task") or "all")


def winrate_rows(rows: list[PreferenceRow], per_category: int) -> list[PreferenceRow]:
    """The first ``per_category`` held-out rows of each category (held-out order is already seeded)."""
    taken: dict[str, int] = {}
    out = []
    for r in rows:
        c = category_of(r)
        if taken.get(c, 0) < per_category:
            taken[c] = taken.get(c, 0) + 1
            out.append(r)
    return out


def judged_rows(ev, data, rows: list[PreferenceRow], seed: int) -> list[PreferenceRow]:
    """The win-rate prompts: ``per_category`` held-out rows of each category, or with
    ``eval.winrate.categories: hh`` the study's draw from HH's helpful and harmless test splits (for a
    source in the ``hh`` format; other sources keep their held-out rows)."""
    w = ev.winrate
    if not w.enabled:
        return []
    if draws_hh_categories(w, data):
        return hh_category_rows(data.source, data.test_split or "test", w.per_category, seed)
    return winrate_rows(rows, w.per_category)


# ---------------------------------------------------------------- one evaluation each


def _folder(name: str) -> str:

    return str(Path(resolve_model(name)).resolve())


def generations(cfg: Config, name: str, model, tok, rows: list[PreferenceRow]) -> list[str]:
    """Responses of the model to ``rows``' prompts (cached by model files, prompts and settings),
    through ``generation.engine`` (the builtin loop uses the loaded ``model``)."""
    w = cfg.eval.winrate
    settings = {"max_new_tokens": w.max_new_tokens, "temperature": w.temperature, "top_p": w.top_p,
                "seed": cfg.seed, "max_prompt_length": cfg.data.max_prompt_length, "precision": cfg.precision}
    key = {"model": model_fingerprint(name), "prompts": [r.key for r in rows], **settings}
    if cfg.generation.engine != "builtin":  # another engine samples differently: its own cache entries
        key["engine"] = cfg.generation.engine
        seed = cfg.seed if cfg.generation.send_seed else None
        sampling = Sampling(w.max_new_tokens, w.temperature, w.top_p, seed=seed, batch_size=cfg.eval.batch_size)
        return cached("generations", key, lambda: [g[0].text for g in engines.sample(
            cfg, _folder(name), [r.prompt for r in rows], sampling)], about=_folder(name))
    return cached("generations", key, lambda: generation.generate(
        model, tok, [r.prompt for r in rows], w.max_new_tokens, w.temperature, w.top_p, cfg.seed,
        cfg.eval.batch_size, max_prompt_length=cfg.data.max_prompt_length), about=_folder(name))


def judge_items(rows: list[PreferenceRow], responses: list[str], references: list[str]) -> list[dict]:
    return [{"prompt": r.prompt, "model": s, "reference": ref, "meta": r.meta, "category": category_of(r)}
            for r, s, ref in zip(rows, responses, references)]


def judge(cfg: Config, items: list[dict]):
    """Both-order judgments of ``items`` with the configured judge (judgments cached in the eval cache)."""
    w = cfg.eval.winrate
    judge_ = make_judge(w)
    try:
        return judge_pairs(judge_, items, cache_dir() / "judgments" / f"{w.judge}.jsonl", w.concurrency,
                           w.requests_per_second, w.max_calls, progress=True)
    finally:
        if hasattr(judge_, "close"):
            judge_.close()


def checked_entry(rows: list[PreferenceRow], responses: list[str]) -> tuple[dict, list]:
    """Checked-answer accuracy on the rows that carry a checkable answer, with a 95% Wilson interval,
    and the per-prompt 0/1 (None where unchecked) for paired comparisons."""
    per = [check(r.meta, s) for r, s in zip(rows, responses)]
    marks = [None if c is None else float(c) for c in per]
    done = [m for m in marks if m is not None]
    if not done:
        return {}, marks
    low, high = wilson_interval(sum(done), len(done))
    return {"correct": int(sum(done)), "n": len(done), "accuracy": sum(done) / len(done),
            "ci_low": low, "ci_high": high}, marks


def winrate_entry(run, vs: str) -> dict:
    summary = run.summary()
    return summary | {"vs": vs}


def heldout_entry(cfg: Config, name: str, model, tok) -> dict:
    """Held-out loss with per-chunk values (cached by model files, corpus and chunking)."""
    h = cfg.eval.heldout
    corpus = (h.corpus, h.subset, h.split, h.text_column, h.max_documents)
    key = {"model": model_fingerprint(name), "corpus": h.corpus, "chunk_length": h.chunk_length,
           "max_chunks": h.max_chunks, "precision": cfg.precision}
    if heldout_lm.looks_like_dataset(h.corpus):
        key["dataset"] = corpus[1:]
    return cached("heldout", key, lambda: heldout_lm.heldout_loss(model, tok, heldout_lm.load_corpus(*corpus), h.chunk_length,
                                                      h.max_chunks, cfg.eval.batch_size), about=_folder(name))


def tasks_entry(cfg: Config, name: str, model, tok) -> dict:

    key = {"model": model_fingerprint(name), "tasks": cfg.eval.tasks, "limit": cfg.eval.tasks_limit,
           "precision": cfg.precision}
    return cached("tasks", key, lambda: run_tasks(model, tok, cfg.eval.tasks, cfg.eval.tasks_limit,
                                                 cfg.eval.batch_size, cfg.seed), about=_folder(name))


def rewards_entry(cfg: Config, name: str, model, tok, reference: str | None, rows: list[PreferenceRow]) -> dict:
    """``rewards/accuracies`` and margins against ``reference`` through the training core's
    ``evaluate_rewards``; a LoRA model whose base is the reference uses itself with adapters off."""
    if not METHODS["dpo"].needs_reference(cfg.dpo):
        return evaluate_rewards(model, tok, None, rows, cfg)
    path = resolve_model(name)
    if is_adapter(path) and Path(adapter_base(path)).resolve() == Path(resolve_model(reference)).resolve():
        return evaluate_rewards(model, tok, "adapter", rows, cfg)
    ref_model, _ = load_for_inference(reference, cfg.precision, **trust_options(cfg))
    return evaluate_rewards(model, tok, ref_model, rows, cfg)


def _kl_key(cfg: Config, name: str, reference: str, rows: list[PreferenceRow]) -> dict:
    return {"model": model_fingerprint(name), "reference": model_fingerprint(reference),
            "rows": [r.key for r in rows], "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length, "precision": cfg.precision}


def _reference_of(cfg: Config, name: str, reference: str):
    """``"adapter"`` for a LoRA model whose base is the reference (itself with adapters off), else the
    reference model loaded for inference."""
    path = resolve_model(name)
    if is_adapter(path) and Path(adapter_base(path)).resolve() == Path(resolve_model(reference)).resolve():
        return "adapter"
    return load_for_inference(reference, cfg.precision, **trust_options(cfg))[0]


def kl_entry(cfg: Config, name: str, model, tok, reference: str, rows: list[PreferenceRow]) -> dict:
    """Per-token KL from ``reference`` on the held-out chosen completions (cached by both models'
    files and the rows); a LoRA model whose base is the reference uses itself with adapters off."""
    return cached("kl", _kl_key(cfg, name, reference, rows), lambda: token_kl(
        model, _reference_of(cfg, name, reference), tok, rows, cfg.data.max_length, cfg.data.max_prompt_length,
        max(1, cfg.eval.batch_size // 2)), about=_folder(name))


def rewards_kl_entries(cfg: Config, name: str, model, tok, reference: str, rows: list[PreferenceRow]) -> tuple[dict, dict]:
    """``(rewards, kl)`` as :func:`rewards_entry` and :func:`kl_entry` give them, from one pass of the
    model and its reference over the held-out pairs (eval/kl.py's ``rewards_and_kl``) when the KL is not
    cached yet and the loss has a reference and chunked log-probs; else the two entries."""
    one_pass = METHODS["dpo"].needs_reference(cfg.dpo) and cfg.dpo.chunked_logps
    if not one_pass or _cached_value("kl", _kl_key(cfg, name, reference, rows)) is not None:
        return rewards_entry(cfg, name, model, tok, reference, rows), kl_entry(cfg, name, model, tok, reference, rows)
    rewards, kl = rewards_and_kl(model, tok, _reference_of(cfg, name, reference), rows, cfg)
    return rewards, cached("kl", _kl_key(cfg, name, reference, rows), lambda: kl, about=_folder(name))


# ---------------------------------------------------------------- extra evaluation datasets

log = logging.getLogger("preftune")


def winrate_problem(cfg: Config, rows: list[PreferenceRow]) -> str | None:
    """Why the configured judge can score none of the win-rate ``rows`` (None: it can score some, or
    only trying tells): the ``rule`` judge needs rows whose ``meta`` holds a checkable answer. Known
    before anything is generated, or trained."""
    w = cfg.eval.winrate
    if not (w.enabled and w.judge == "rule" and rows) or any(check(r.meta, "") is not None for r in rows):
        return None
    return (f"the rule judge can score none of the {len(rows)} win-rate rows (none has a checkable answer in its "
            "meta); set eval.winrate.judge to openai or hf (with judge_model), or eval.winrate.enabled=false")


DatasetInputs = tuple[str, Config, list[PreferenceRow], list[PreferenceRow]]
"""(name, the config with that dataset as its ``data``, held-out rows, win-rate rows)."""


def dataset_inputs(cfg: Config) -> list[DatasetInputs]:
    """The held-out rows of every ``eval.datasets`` entry, chosen as ``heldout_rows`` chooses
    ``data``'s (its own split, or ``test_size`` carved off with the seed), and its win-rate rows."""
    ev = cfg.eval
    if not (ev.rewards or ev.winrate.enabled):
        return []
    out = []
    for i, ds in enumerate(ev.datasets):
        where = f"eval.datasets[{i}] ({ds.name})"
        try:
            _, rows, _ = load_rows(ds, "preference", cfg.seed)
        except PreftuneError as e:
            raise PreftuneError(f"{where}: {e}") from None
        if not rows:
            raise PreftuneError(f"{where}: no held-out rows in {ds.source}; set eval.datasets[{i}].test_split, "
                                "test_size or test_source")
        wr_rows = judged_rows(ev, ds, rows, cfg.seed)
        out.append((ds.name, dataclasses.replace(cfg, data=ds), rows, wr_rows))
    return out


def dataset_entries(sets: list[DatasetInputs], name: str, path: str, model, tok, reference: str | None,
                    out: Path) -> dict[str, dict]:
    """One model on every extra dataset: ``{dataset: {rewards, winrate, checked}}`` through the same
    entry functions (and caches) as the run's own data; samples go to ``out/datasets/<dataset>/``."""
    figures = {}
    for ds_name, sub, rows, wr_rows in sets:
        entry: dict = {}
        if sub.eval.rewards and reference:
            entry["rewards"] = rewards_entry(sub, path, model, tok, reference, rows)
        if wr_rows:
            responses = generations(sub, path, model, tok, wr_rows)
            run = judge(sub, judge_items(wr_rows, responses, [r.chosen for r in wr_rows]))
            entry["winrate"] = winrate_entry(run, "chosen")
            checked, _ = checked_entry(wr_rows, responses)
            if checked:
                entry["checked"] = checked
            _write_samples(EvalDir(out).samples(name, ds_name), wr_rows, responses, run)
        figures[ds_name] = entry
    return figures


# ---------------------------------------------------------------- the suite


def _has_lm_eval(results: dict) -> bool:
    """Downstream tasks need the ``eval`` extra; without it the suite skips them, says so, and
    records why under ``skipped`` (``preftune eval tasks`` stops with the error instead)."""
    try:
        import lm_eval  # noqa: F401  (here: lm-eval is the optional, heavy `eval` extra)

        return True
    except ImportError:
        pass

    msg = str(MissingExtraError("lm-eval", "eval", "downstream tasks"))
    print(f"preftune: skipping downstream tasks: {msg}", file=sys.stderr)
    results.setdefault("skipped", {})["tasks"] = msg
    return False


def _write_samples(path: Path, rows: list[PreferenceRow], responses: list[str], run) -> None:

    generation.write_jsonl(path, [{"prompt": r.prompt, "response": s, "chosen": r.chosen, "category": category_of(r),
                        "score": res["score"], "status": res["status"], "meta": r.meta}
                       for r, s, res in zip(rows, responses, run.results)])


def evaluate_models(cfg: Config, models: dict[str, str], out_dir: str | Path,
                    reference_for: dict[str, str | None] | None = None, json_name: str = "eval.json",
                    brief: Collection[str] = ()) -> dict:
    """Run the configured evaluations (``cfg.eval``) for every ``name -> model or run folder`` and
    write ``out_dir/eval.json`` (``json_name``; after each model, so a crash keeps what finished).

    ``reference_for[name]`` is the reference for that model's reward accuracy (models without one,
    such as the base, get none). Win-rate is against the dataset's chosen responses; with two or
    more models, the paired bootstrap of their per-prompt scores is stored under ``comparisons``.
    Per-prompt generations and scores go to ``out_dir/samples-<name>.jsonl``. Each ``eval.datasets``
    entry adds reward accuracy, win-rate and checked accuracy on its held-out rows under
    ``datasets: {dataset: {model: {...}}}``. Models named in ``brief`` (the on-policy rounds before
    the last) get only their generations judged and checked and their KL."""
    out = Path(out_dir)
    reference_for = reference_for or {}
    ev = cfg.eval
    need_rows = ev.rewards or ev.winrate.enabled or ev.kl
    rows = heldout_rows(cfg) if need_rows else []
    wr_rows = judged_rows(ev, cfg.data, rows, cfg.seed)
    if problem := winrate_problem(cfg, wr_rows):
        log.warning("win-rate skipped: %s", problem)
        wr_rows = []
    results: dict = {"models": {}, "comparisons": {}, "config": to_dict(ev)}
    do_tasks = bool(ev.tasks) and _has_lm_eval(results)
    sets = dataset_inputs(cfg)
    scores: dict[str, list] = {}
    checked_marks: dict[str, list] = {}
    chunks: dict[str, dict] = {}
    for name, path in models.items():
        model, tok = load_for_inference(str(path), cfg.precision, **trust_options(cfg))
        entry: dict = {"path": str(path)}
        full = name not in brief
        if full and ev.rewards and ev.kl and reference_for.get(name) and rows:
            entry["rewards"], entry["kl"] = rewards_kl_entries(cfg, str(path), model, tok, reference_for[name], rows)
        elif full and ev.rewards and reference_for.get(name):
            entry["rewards"] = rewards_entry(cfg, str(path), model, tok, reference_for[name], rows)
        elif ev.kl and reference_for.get(name) and rows:
            entry["kl"] = kl_entry(cfg, str(path), model, tok, reference_for[name], rows)
        if wr_rows:
            responses = generations(cfg, str(path), model, tok, wr_rows)
            run = judge(cfg, judge_items(wr_rows, responses, [r.chosen for r in wr_rows]))
            entry["winrate"] = winrate_entry(run, "chosen")
            scores[name] = run.scores
            checked, checked_marks[name] = checked_entry(wr_rows, responses)
            if checked:
                entry["checked"] = checked
            _write_samples(EvalDir(out).samples(name), wr_rows, responses, run)
        if full and ev.heldout.enabled:
            ho = heldout_entry(cfg, str(path), model, tok)
            chunks[name] = ho["per_chunk"]
            entry["heldout"] = {k: ho[k] for k in PUBLIC_HELDOUT}
        if full and do_tasks:
            entry["tasks"] = tasks_entry(cfg, str(path), model, tok)
        results["models"][name] = entry
        for ds_name, figures in dataset_entries(sets if full else [], name, str(path), model, tok,
                                                reference_for.get(name), out).items():
            results.setdefault("datasets", {}).setdefault(ds_name, {})[name] = figures
        del model
        write_json(out / json_name, results)
    if "base" in chunks:
        for name, per_chunk in chunks.items():
            if name != "base":
                results["models"][name]["heldout"]["diff_vs_base"] = heldout_lm.paired_difference(per_chunk, chunks["base"])
    names = list(scores)
    for i, a in enumerate(names):
        for b in names[:i]:
            mean, low, high = paired_bootstrap(scores[a], scores[b], seed=cfg.seed)
            results["comparisons"][f"{a}-{b}"] = {"mean": mean, "low": low, "high": high,
                                                  "n": sum(1 for x, y in zip(scores[a], scores[b])
                                                           if x is not None and y is not None)}
            if any(m is not None for m in checked_marks.get(a, [])):
                mean, low, high = paired_bootstrap(checked_marks[a], checked_marks[b], seed=cfg.seed)
                results["comparisons"][f"{a}-{b}"]["checked_accuracy"] = {"mean": mean, "low": low, "high": high}
    write_json(out / json_name, results)
    return results


# ---------------------------------------------------------------- printing
