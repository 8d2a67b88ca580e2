"""On-policy preference rounds (semi-online / iterative DPO): each round draws training prompts,
samples completions from the current policy, scores them (a rule, a pairwise judge or a reward
model), pairs the best against the worst and trains one preference stage on those pairs through the
same loop. A round is a folder, ``rounds/round-K/`` (``paths.RoundDir``):

  samples.jsonl   every prompt with its samples and their scores
  pairs.jsonl     the pairs built (a standard preference file: ``preftune data inspect`` reads it)
  heldout.jsonl   the run's held-out rows, which the round's stage evaluates on
  start/          the round's starting model, when a LoRA adapter had to be merged first
  dpo/            the round's preference stage (a normal stage folder)
  round.json      the counts, the engine's parity figures and the stage's figures, written last: a
                  round with it is finished

Samples come from ``generation.engine`` (builtin, vLLM, or a server); an outside engine's samples are
checked against the policy (log-prob parity) before anything is scored or trained on them.

A finished round is never redone; a killed one is removed and restarts from its beginning (drawing,
sampling and training are seeded, so it makes the same pairs again)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

from preftune.config import Config, DataConfig
from preftune.data.rows import PreferenceRow, row_key
from preftune.data.sources import load_rows
from preftune.errors import PreftuneError
from preftune.eval.checks import check, checkable
from preftune.eval.engines import Sampling, check_parity, make_engine
from preftune.eval.generate import prompt_ids, write_jsonl
from preftune.eval.judges import judge_pairs, make_judge
from preftune.eval.suite import cache_dir
from preftune.files import write_json
from preftune.model import is_adapter, merge_adapter
from preftune.paths import RoundDir, RunDir, StageDir
from preftune.reward import load_reward_model, score_responses
from preftune.train import run_stage

log = logging.getLogger("preftune")


# ---------------------------------------------------------------- scoring


def rule_scores(rows: list[PreferenceRow], responses: list[list[str]]) -> list[list[float | None]]:
    """1.0 when a sample gets the row's checkable answer right, else 0.0."""
    missing = sum(1 for r in rows if not checkable(r.meta))
    if missing:
        raise PreftuneError(f"rounds.reward: 'rule' scores samples by the row's checkable answer, but {missing} of "
                            f"the {len(rows)} drawn prompts have none (meta.check and meta.answer); use data whose "
                            "rows carry answers, or rounds.reward 'judge' or 'reward_model'")
    return [[float(check(r.meta, s)) for s in group] for r, group in zip(rows, responses)]


def judge_scores(cfg: Config, rows: list[PreferenceRow], responses: list[list[str]], cache: Path):
    """Each sample judged against the row's chosen response in both orders (``eval.winrate``'s judge):
    1 win, 0.5 tie or split verdict, 0 loss, None when the judge's answers were invalid."""
    items = [{"prompt": r.prompt, "model": s, "reference": r.chosen, "meta": r.meta}
             for r, group in zip(rows, responses) for s in group]
    w = cfg.eval.winrate
    judge = make_judge(w)
    try:
        run = judge_pairs(judge, items, cache, w.concurrency, w.requests_per_second, w.max_calls, progress=True)
    finally:
        if hasattr(judge, "close"):
            judge.close()
    flat = [res["score"] for res in run.results]
    k = len(responses[0]) if responses else 0
    return [flat[i * k : (i + 1) * k] for i in range(len(rows))]


def reward_model_scores(path: str, rows: list[PreferenceRow], responses: list[list[str]], batch_size: int = 8,
                        data: DataConfig | None = None):
    """Each sample's reward from the classifier at ``path`` (reward.score_responses: a reward model from
    ``preftune rm`` on the ids it trained on; a sample the tokenizer drops scores None)."""
    loaded = load_reward_model(path, "rounds.reward_model")
    flat = score_responses(loaded, [r.prompt for r, g in zip(rows, responses) for _ in g],
                           [s for g in responses for s in g], batch_size, data)
    k = len(responses[0]) if responses else 0
    return [flat[j * k : (j + 1) * k] for j in range(len(rows))]


# ---------------------------------------------------------------- pairs


def build_pairs(rows: list[PreferenceRow], responses: list[list[str]], scores: list[list[float | None]],
                round_no: int) -> tuple[list[PreferenceRow], dict]:
    """Highest-scored sample as chosen, lowest as rejected, per prompt. A group whose scored samples
    all tie (or that has fewer than two scored samples, or only identical texts) makes no pair; each
    is counted."""
    pairs, counts = [], {"ties": 0, "unscored": 0, "identical": 0}
    for row, group, sc in zip(rows, responses, scores):
        scored = [(s, t) for s, t in zip(sc, group) if s is not None]
        if len(scored) < 2:
            counts["unscored"] += 1
            continue
        best = max(scored, key=lambda x: x[0])
        worst = min(scored, key=lambda x: x[0])
        if best[0] == worst[0]:
            counts["ties"] += 1
            continue
        if best[1].strip() == worst[1].strip() or not best[1].strip() or not worst[1].strip():
            counts["identical"] += 1
            continue
        meta = {**row.meta, "round": round_no, "chosen_score": best[0], "rejected_score": worst[0]}
        pairs.append(PreferenceRow(row.prompt, best[1], worst[1], meta))
    return pairs, counts


def write_rows(path: Path, rows: list[PreferenceRow]) -> Path:
    """Preference rows as a standard ``prompt``/``chosen``/``rejected`` JSONL file."""
    return write_jsonl(path, [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected, "meta": r.meta}
                              for r in rows])


# ---------------------------------------------------------------- one round


def prompt_pool(train_rows: list[PreferenceRow], reward: str,
                heldout: list[PreferenceRow] = ()) -> tuple[list[PreferenceRow], dict]:
    """The training rows a round draws its prompts from, and what was left out (counted): rows whose
    prompt is also a held-out prompt (data with several pairs per prompt can put one prompt on both
    sides of the split; training on it would leak into the held-out figures), and with a ``rule``
    reward rows with no checkable answer (mixed data such as the embedded set also holds hand-written
    rows without one). No row to draw from is an error, raised before any generation."""
    held = {row_key(row.prompt) for row in heldout}
    unseen = [row for row in train_rows if row_key(row.prompt) not in held]
    left_out = {"heldout_prompts_left_out": len(train_rows) - len(unseen), "unchecked_rows_left_out": 0}
    if not unseen:
        raise PreftuneError("rounds: 0 pairs can be built: there are no training prompts to draw from"
                            + (" (every training prompt is also a held-out prompt)" if train_rows else ""))
    if reward != "rule":
        return unseen, left_out
    pool = [row for row in unseen if checkable(row.meta)]
    if not pool:
        raise PreftuneError(f"rounds.reward: 'rule' scores samples by the row's checkable answer, but none of the "
                            f"{len(unseen)} training rows has one (meta.check and meta.answer); use data whose "
                            "rows carry answers, or rounds.reward 'judge' or 'reward_model'")
    return pool, left_out | {"unchecked_rows_left_out": len(unseen) - len(pool)}


def _start_model(cfg: Config, start: str, round_dir: RoundDir) -> str:
    """The folder the round's stage trains from. With LoRA and the ``round_start`` reference, an
    adapter is merged first so that fresh adapters (and their disabled state, the reference) sit on
    the round's starting policy; with the ``sft`` reference the previous adapter keeps training."""
    if cfg.lora.enabled and cfg.rounds.reference == "round_start" and is_adapter(start):
        return str(merge_adapter(start, round_dir.start).resolve())
    return start


def round_config(cfg: Config, round_dir: str | Path | RoundDir) -> Config:
    """The config of a round's preference stage: its pairs, the run's held-out rows, the rounds' settings."""
    r = cfg.rounds
    rd = round_dir if isinstance(round_dir, RoundDir) else RoundDir(round_dir)
    data = DataConfig(source=str(rd.pairs), format="standard", test_source=str(rd.heldout),
                      max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                      max_eval_rows=cfg.data.max_eval_rows)
    return dataclasses.replace(cfg, data=data, dpo=r.stage_dpo(cfg.dpo), eval=dataclasses.replace(cfg.eval, curve_every=0))


def sample(cfg: Config, engine, model_path: str, rows: list[PreferenceRow], round_no: int) -> tuple[list[list[str]], dict | None]:
    """``rounds.samples`` completions per prompt from the policy at ``model_path`` through ``engine``,
    seeded by the run's seed and the round, and the engine's parity figures (a gap beyond the
    tolerance stops the round here, before any scoring or training)."""
    r, g = cfg.rounds, cfg.generation
    engine.load(model_path)
    seed = cfg.seed + 1000 * round_no if engine.name == "builtin" or g.send_seed else None
    settings = Sampling(r.max_new_tokens, r.temperature, r.top_p, n=r.samples, seed=seed,
                        logprobs=engine.name != "builtin" and g.parity_samples > 0, batch_size=r.batch_size)
    encoded = [prompt_ids(row.prompt, engine.tokenizer, cfg.data.max_prompt_length) for row in rows]
    groups = engine.sample(encoded, settings)
    engine.release()
    figures = check_parity(cfg, engine, model_path, groups, encoded, f"round {round_no}")
    return [[c.text for c in group] for group in groups], figures


def score(cfg: Config, rows, responses) -> list[list[float | None]]:
    r = cfg.rounds
    if r.reward == "rule":
        return rule_scores(rows, responses)
    if r.reward == "judge":
        return judge_scores(cfg, rows, responses, cache_dir() / "judgments" / f"{cfg.eval.winrate.judge}.jsonl")
    return reward_model_scores(r.reward_model, rows, responses, cfg.eval.batch_size, cfg.data)


def _last_eval(stage_dir: StageDir) -> dict:
    """The stage's last held-out evaluation record (``eval/...`` keys)."""
    last: dict = {}
    path = stage_dir.metrics
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if any(k.startswith("eval/") for k in rec):
                last = {k: v for k, v in rec.items() if k.startswith("eval/")}
    return last


def run_round(cfg: Config, round_no: int, start: str, train_rows: list[PreferenceRow],
              heldout: list[PreferenceRow], out: Path, engine=None) -> dict:
    """Run round ``round_no`` from the policy at ``start`` into ``out/rounds/round-K``, sampling through
    ``engine`` (default: the configured one); return its record."""
    r = cfg.rounds
    round_dir = RunDir(out).round(round_no)
    if round_dir.root.exists():
        log.info("round %d: an unfinished round folder is left from a killed run; starting the round again",
                 round_no)
        shutil.rmtree(round_dir.root)
    round_dir.root.mkdir(parents=True)
    pool, left_out = prompt_pool(train_rows, r.reward, heldout)
    rng = random.Random(cfg.seed * 7919 + round_no)
    drawn = rng.sample(pool, min(r.prompts, len(pool)))
    own = engine is None
    engine = engine or make_engine(cfg)
    try:
        responses, parity = sample(cfg, engine, start, drawn, round_no)
    finally:
        if own:
            engine.close()
    scores = score(cfg, drawn, responses)
    write_jsonl(round_dir.samples, [
        {"prompt": row.prompt, "meta": row.meta, "samples": [{"response": s, "score": x} for s, x in zip(g, sc)]}
        for row, g, sc in zip(drawn, responses, scores)])
    pairs, counts = build_pairs(drawn, responses, scores, round_no)
    if not pairs:
        why = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        raise PreftuneError(f"round {round_no} built 0 pairs from {len(drawn)} prompts ({why}): every group of "
                            f"samples scored the same. Raise rounds.samples or rounds.temperature, or use a "
                            "reward that separates the samples")
    offline = rng.sample(train_rows, min(r.mix_offline, len(train_rows))) if r.mix_offline else []
    write_rows(round_dir.pairs, pairs + offline)
    write_rows(round_dir.heldout, heldout)
    flat = [x for sc in scores for x in sc if x is not None]
    record = {"round": round_no, "start_model": start, "engine": cfg.generation.engine, "parity": parity,
              "reward": r.reward, "reference": r.reference,
              **left_out, "prompts": len(drawn), "samples": len(drawn) * r.samples, "scored": len(flat), **counts,
              "pairs": len(pairs), "offline_pairs": len(offline),
              "reward_mean": sum(flat) / len(flat) if flat else None}
    log.info("round %d: %d prompts x %d samples, mean reward %.3f, %d pairs (%d ties, %d unscored, %d identical)",
             round_no, len(drawn), r.samples, record["reward_mean"] or 0.0, len(pairs), counts["ties"],
             counts["unscored"], counts["identical"])
    stage_cfg = round_config(cfg, round_dir)
    stage = round_dir.stage
    # an unfinished round (no round.json) trains on freshly sampled pairs: its stage is redone
    summary = run_stage(stage_cfg, "dpo", stage.root, _start_model(cfg, start, round_dir), overwrite=True)
    record |= {"stage": {k: summary.get(k) for k in ("steps", "pairs_seen", "tokens_seen", "best_step")},
               "final_model": str(stage.final.resolve()), **_last_eval(stage)}
    write_json(round_dir.record, record)  # last: marks the round finished
    return record


def run_rounds(cfg: Config, out: str | Path, start: str) -> list[dict]:
    """``cfg.rounds.n`` rounds from the policy at ``start``; finished rounds are read back, not redone.
    Returns the per-round records (``round.json``)."""
    out = Path(out)
    train_rows, heldout, _ = load_rows(cfg.data, "preference", cfg.seed)
    records = []
    engine = make_engine(cfg)  # not installed or not reachable: stops here, before any round trains
    try:
        for k in range(1, cfg.rounds.n + 1):
            done = RunDir(out).round(k)
            if done.is_finished():
                rec = json.loads(done.record.read_text())
                log.info("round %d: finished earlier (%d pairs); not redone", k, rec["pairs"])
            else:
                rec = run_round(cfg, k, start, train_rows, heldout, out, engine)
            records.append(rec)
            start = rec["final_model"]
    finally:
        engine.close()
    return records


def final_model(out: str | Path, n: int) -> Path | None:
    """The policy after the last finished round, if any."""
    for k in range(n, 0, -1):
        done = RunDir(out).round(k)
        if done.is_finished():
            return Path(json.loads(done.record.read_text())["final_model"])
    return None
