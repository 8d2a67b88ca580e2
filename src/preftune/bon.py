"""Best-of-n (rejection) sampling: ``rounds.samples`` answers per training prompt through the rounds'
generation path, scored by the rounds' reward (a reward model, the rule or a judge); the best answer
of each prompt goes to an SFT file, best against worst to a preference file, with the reward
distribution in a summary. The folder ``bon/``:

  samples.jsonl   every prompt with its samples and their rewards
  sft.jsonl       the best sample per prompt (``prompt``/``completion``: an SFT source as it is)
  pairs.jsonl     best vs worst per prompt (``prompt``/``chosen``/``rejected``)
  summary.json    counts (prompts whose samples all tie are left out of both files) and the rewards"""

from __future__ import annotations

import logging
import random
import statistics
from pathlib import Path

from preftune.config import Config
from preftune.data.rows import PreferenceRow
from preftune.data.sources import load_rows
from preftune.errors import PreftuneError
from preftune.eval.engines import make_engine
from preftune.eval.generate import write_jsonl
from preftune.files import write_json
from preftune.paths import BonDir
from preftune.rounds import build_pairs, prompt_pool, sample, score, write_rows

log = logging.getLogger("preftune")


def best_samples(rows: list[PreferenceRow], responses: list[list[str]],
                 scores: list[list[float | None]]) -> tuple[list[dict], dict]:
    """Per prompt, its highest-reward sample (the first of equal best) as an SFT record ``{prompt,
    completion, meta}``. A prompt whose scored samples all tie (one reward for all, or fewer than two
    scored) has no best: it is left out and counted under ``all_tied`` (``unscored`` when none scored)."""
    best, counts = [], {"all_tied": 0, "unscored": 0}
    for row, group, sc in zip(rows, responses, scores):
        scored = [(s, t) for s, t in zip(sc, group) if s is not None]
        if not scored:
            counts["unscored"] += 1
            continue
        rewards = {s for s, _ in scored}
        if len(scored) < 2 or len(rewards) == 1:
            counts["all_tied"] += 1
            continue
        top = max(s for s, _ in scored)
        text = next(t for s, t in scored if s == top)
        best.append({"prompt": row.prompt, "completion": text, "meta": {**row.meta, "reward": top}})
    return best, counts


def reward_summary(scores: list[list[float | None]]) -> dict:
    """The distribution of every scored sample's reward, and the mean best, worst and best-minus-group-mean."""
    flat = sorted(x for sc in scores for x in sc if x is not None)
    if not flat:
        return {"scored": 0}
    groups = [[x for x in sc if x is not None] for sc in scores]
    groups = [g for g in groups if g]

    def q(p: float) -> float:
        return flat[min(len(flat) - 1, int(p * len(flat)))]

    return {"scored": len(flat), "mean": statistics.fmean(flat), "std": statistics.pstdev(flat), "min": flat[0],
            "p25": q(0.25), "median": statistics.median(flat), "p75": q(0.75), "max": flat[-1],
            "best_mean": statistics.fmean(max(g) for g in groups), "worst_mean": statistics.fmean(min(g) for g in groups),
            "best_gain": statistics.fmean(max(g) - statistics.fmean(g) for g in groups)}


def run_bon(cfg: Config, model_path: str, out: str | Path, reward_fn=None) -> dict:
    """Best-of-n from the policy at ``model_path`` over ``bon.prompts`` training prompts (all when
    null, seeded draw otherwise) into ``out``; returns the summary (also ``summary.json``).
    ``reward_fn(rows, responses) -> scores`` replaces the configured reward (a hand-made reward)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = BonDir(out)
    r = cfg.rounds
    train_rows, heldout, _ = load_rows(cfg.data, "preference", cfg.seed)
    pool, left_out = prompt_pool(train_rows, r.reward, heldout)
    unique = list({repr(row.prompt): row for row in pool}.values())  # one draw per prompt
    n = cfg.bon.prompts
    drawn = unique if n is None or n >= len(unique) else random.Random(cfg.seed * 7919).sample(unique, n)
    engine = make_engine(cfg)  # not installed or not reachable: stops before sampling
    try:
        responses, _ = sample(cfg, engine, model_path, drawn, 0)
    finally:
        engine.close()
    scores = reward_fn(drawn, responses) if reward_fn else score(cfg, drawn, responses)
    write_jsonl(folder.samples, [
        {"prompt": row.prompt, "meta": row.meta, "samples": [{"response": s, "reward": x} for s, x in zip(g, sc)]}
        for row, g, sc in zip(drawn, responses, scores)])
    best, counts = best_samples(drawn, responses, scores)
    if not best:
        raise PreftuneError(f"bon: no prompt of {len(drawn)} had a best sample ({counts['all_tied']} all tied, "
                            f"{counts['unscored']} unscored); raise rounds.samples or rounds.temperature, or use a "
                            "reward that separates the samples")
    pairs, pair_counts = build_pairs(drawn, responses, scores, 0)
    write_jsonl(folder.sft, best)
    write_rows(folder.pairs, pairs)
    summary = {"model": model_path, "reward": r.reward, "reward_model": r.reward_model, "n": r.samples,
               "prompts": len(drawn), **left_out, **counts, "sft_rows": len(best), "pairs": len(pairs),
               "identical_best_worst": pair_counts["identical"], "rewards": reward_summary(scores)}
    write_json(folder.summary, summary)
    log.info("bon: %d prompts x %d samples -> %d best (SFT), %d pairs; %d prompts all tied, %d unscored",
             len(drawn), r.samples, len(best), len(pairs), counts["all_tied"], counts["unscored"])
    return summary
