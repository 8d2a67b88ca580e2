"""On-policy preference rounds (semi-online / iterative DPO): each round draws training prompts,
samples completions from the current policy, scores them (a rule, a pairwise judge or a reward
model), pairs the best against the worst and trains one preference stage on those pairs through the
same loop. A round is a folder, ``rounds/round-K/``:

  samples.jsonl   every prompt with its samples and their scores
  pairs.jsonl     the pairs built (a standard preference file: ``preftune data inspect`` reads it)
  heldout.jsonl   the run's held-out rows, which the round's stage evaluates on
  start/          the round's starting model, when a LoRA adapter had to be merged first
  dpo/            the round's preference stage (a normal stage folder)
  round.json      the counts and the stage's figures, written last: a round with it is finished

A finished round is never redone; a killed one is removed and restarts from its beginning (drawing,
sampling and training are seeded, so it makes the same pairs again)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from preftune.config import Config, DataConfig
from preftune.data.rows import PreferenceRow, row_key
from preftune.data.sources import load_rows
from preftune.errors import PreftuneError
from preftune.eval.checks import check, checkable
from preftune.eval.generate import generate, write_jsonl
from preftune.eval.judges import judge_pairs, make_judge
from preftune.eval.prompts import prompt_text
from preftune.eval.suite import cache_dir
from preftune.files import write_json
from preftune.model import is_adapter, load_for_inference, merge_adapter
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


def load_reward_model(path: str):
    """A local sequence-classification model (one score per text) and its tokenizer."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise PreftuneError(f"rounds.reward_model: {folder} is not a model folder (no config.json)")
    archs = AutoConfig.from_pretrained(folder).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise PreftuneError(f"rounds.reward_model: {folder} is not a sequence-classification model (its "
                            f"architectures are {archs or 'not given'}); a reward model is an "
                            "AutoModelForSequenceClassification folder")
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _rm_text(prompt, response: str, tok) -> str:
    if getattr(tok, "chat_template", None) and isinstance(prompt, list):
        return tok.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    return f"{prompt_text(prompt)}\n{response}"


@torch.inference_mode()
def reward_model_scores(path: str, rows: list[PreferenceRow], responses: list[list[str]], batch_size: int = 8):
    """The classifier's score of prompt + sample: its logit with one label, else log p(last label)."""
    model, tok = load_reward_model(path)
    texts = [_rm_text(r.prompt, s, tok) for r, group in zip(rows, responses) for s in group]
    flat: list[float] = []
    tok.padding_side = "right"
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=1024)
        logits = model(**enc).logits.float()
        score = logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]
        flat += score.tolist()
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


def _start_model(cfg: Config, start: str, round_dir: Path) -> str:
    """The folder the round's stage trains from. With LoRA and the ``round_start`` reference, an
    adapter is merged first so that fresh adapters (and their disabled state, the reference) sit on
    the round's starting policy; with the ``sft`` reference the previous adapter keeps training."""
    if cfg.lora.enabled and cfg.rounds.reference == "round_start" and is_adapter(start):
        return str(merge_adapter(start, round_dir / "start").resolve())
    return start


def round_config(cfg: Config, round_dir: Path) -> Config:
    """The config of a round's preference stage: its pairs, the run's held-out rows, the rounds' settings."""
    r = cfg.rounds
    data = DataConfig(source=str(round_dir / "pairs.jsonl"), format="standard", test_source=str(round_dir / "heldout.jsonl"),
                      max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                      max_eval_rows=cfg.data.max_eval_rows)
    return dataclasses.replace(cfg, data=data, dpo=r.stage_dpo(cfg.dpo), eval=dataclasses.replace(cfg.eval, curve_every=0))


def sample(cfg: Config, model_path: str, rows: list[PreferenceRow], round_no: int) -> list[list[str]]:
    """``rounds.samples`` completions per prompt from the model, batched through the evaluation's
    generation path, seeded by the run's seed and the round."""
    r = cfg.rounds
    model, tok = load_for_inference(model_path, cfg.precision, merge=True, chat_template=cfg.data.chat_template)
    prompts = [row.prompt for row in rows for _ in range(r.samples)]
    flat = generate(model, tok, prompts, r.max_new_tokens, r.temperature, r.top_p, seed=cfg.seed + 1000 * round_no,
                    batch_size=r.batch_size, max_prompt_length=cfg.data.max_prompt_length)
    del model
    return [flat[i * r.samples : (i + 1) * r.samples] for i in range(len(rows))]


def score(cfg: Config, rows, responses, round_dir: Path) -> list[list[float | None]]:
    r = cfg.rounds
    if r.reward == "rule":
        return rule_scores(rows, responses)
    if r.reward == "judge":
        return judge_scores(cfg, rows, responses, cache_dir() / "judgments" / f"{cfg.eval.winrate.judge}.jsonl")
    return reward_model_scores(r.reward_model, rows, responses, cfg.eval.batch_size)


def _last_eval(stage_dir: Path) -> dict:
    """The stage's last held-out evaluation record (``eval/...`` keys)."""
    last: dict = {}
    path = stage_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if any(k.startswith("eval/") for k in rec):
                last = {k: v for k, v in rec.items() if k.startswith("eval/")}
    return last


def run_round(cfg: Config, round_no: int, start: str, train_rows: list[PreferenceRow],
              heldout: list[PreferenceRow], out: Path) -> dict:
    """Run round ``round_no`` from the policy at ``start`` into ``out/rounds/round-K``; return its record."""
    r = cfg.rounds
    round_dir = out / "rounds" / f"round-{round_no}"
    if round_dir.exists():
        log.info("round %d: an unfinished round folder is left from a killed run; starting the round again",
                 round_no)
        shutil.rmtree(round_dir)
    round_dir.mkdir(parents=True)
    pool, left_out = prompt_pool(train_rows, r.reward, heldout)
    rng = random.Random(cfg.seed * 7919 + round_no)
    drawn = rng.sample(pool, min(r.prompts, len(pool)))
    responses = sample(cfg, start, drawn, round_no)
    scores = score(cfg, drawn, responses, round_dir)
    write_jsonl(round_dir / "samples.jsonl", [
        {"prompt": row.prompt, "meta": row.meta, "samples": [{"response": s, "score": x} for s, x in zip(g, sc)]}
        for row, g, sc in zip(drawn, responses, scores)])
    pairs, counts = build_pairs(drawn, responses, scores, round_no)
    if not pairs:
        why = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        raise PreftuneError(f"round {round_no} built 0 pairs from {len(drawn)} prompts ({why}): every group of "
                            f"samples scored the same. Raise rounds.samples or rounds.temperature, or use a "
                            "reward that separates the samples")
    offline = rng.sample(train_rows, min(r.mix_offline, len(train_rows))) if r.mix_offline else []
    write_rows(round_dir / "pairs.jsonl", pairs + offline)
    write_rows(round_dir / "heldout.jsonl", heldout)
    flat = [x for sc in scores for x in sc if x is not None]
    record = {"round": round_no, "start_model": start, "reward": r.reward, "reference": r.reference,
              **left_out, "prompts": len(drawn), "samples": len(drawn) * r.samples, "scored": len(flat), **counts,
              "pairs": len(pairs), "offline_pairs": len(offline),
              "reward_mean": sum(flat) / len(flat) if flat else None}
    log.info("round %d: %d prompts x %d samples, mean reward %.3f, %d pairs (%d ties, %d unscored, %d identical)",
             round_no, len(drawn), r.samples, record["reward_mean"] or 0.0, len(pairs), counts["ties"],
             counts["unscored"], counts["identical"])
    stage_cfg = round_config(cfg, round_dir)
    # an unfinished round (no round.json) trains on freshly sampled pairs: its stage is redone
    summary = run_stage(stage_cfg, "dpo", round_dir / "dpo", _start_model(cfg, start, round_dir), overwrite=True)
    record |= {"stage": {k: summary.get(k) for k in ("steps", "pairs_seen", "tokens_seen", "best_step")},
               "final_model": str((round_dir / "dpo" / "final").resolve()), **_last_eval(round_dir / "dpo")}
    write_json(round_dir / "round.json", record)  # last: marks the round finished
    return record


def run_rounds(cfg: Config, out: str | Path, start: str) -> list[dict]:
    """``cfg.rounds.n`` rounds from the policy at ``start``; finished rounds are read back, not redone.
    Returns the per-round records (``round.json``)."""
    out = Path(out)
    train_rows, heldout, _ = load_rows(cfg.data, "preference", cfg.seed)
    records = []
    for k in range(1, cfg.rounds.n + 1):
        done = out / "rounds" / f"round-{k}" / "round.json"
        if done.is_file():
            rec = json.loads(done.read_text())
            log.info("round %d: finished earlier (%d pairs); not redone", k, rec["pairs"])
        else:
            rec = run_round(cfg, k, start, train_rows, heldout, out)
        records.append(rec)
        start = rec["final_model"]
    return records


def final_model(out: str | Path, n: int) -> Path | None:
    """The policy after the last finished round, if any."""
    for k in range(n, 0, -1):
        done = Path(out) / "rounds" / f"round-{k}" / "round.json"
        if done.is_file():
            return Path(json.loads(done.read_text())["final_model"])
    return None
