"""``preftune rm`` end to end on tiny models: TRL's metric names, held-out accuracy and ``best/`` at its
peak, the card, exact resume, ``final/`` loaded as it is in another folder with the same rewards; the
reward model in an on-policy round on open-ended rows (no checkable answer), as the win-rate judge, in
``preftune bon`` (with a hand-made reward too) and in ``preftune eval rm``; clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.config import ConfigError
from preftune.config.validate import load_config
from preftune.data.rows import PreferenceRow
from preftune.data.tokenize import RowKind, tokenize
from preftune.errors import PreftuneError
from preftune.reward import RECORD, load_reward_model, score_responses
from preftune.train import run_stage

HAND = Path(__import__("preftune").__file__).parent / "resources" / "hand_pairs.jsonl"


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def rm_cfg(tmp_path: Path, *extra: str):
    """A tiny full fine-tuned reward model on 32 open-ended hand-written rows (helpful and harmless)."""
    return load_config(None, ["model=tiny", f"output_dir={tmp_path / 'run'}", f"data.source={HAND}",
                              "data.max_rows=32", "data.test_size=0.25", "data.max_length=96", "data.max_prompt_length=48", "lora.enabled=false",
                              "rm.max_steps=6", "rm.batch_size=4", "rm.lr=3e-3", "rm.warmup_ratio=0",
                              "rm.eval_every=2", "rm.eval_batch_size=8", *extra])


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """One rm run shared by the tests below: its config and stage folder."""
    tmp = tmp_path_factory.mktemp("rm")
    import os

    os.environ["PREFTUNE_CACHE"] = str(tmp / "cache")
    cfg = rm_cfg(tmp, "rm.early_stopping=true", "rm.patience=5")
    from preftune.model import resolve_model

    out = tmp / "run" / "rm"
    run_stage(cfg, "rm", out, resolve_model("tiny"))
    from preftune.card import update_card

    update_card(out)
    return cfg, out


@pytest.mark.e2e
def test_rm_trains_with_trl_names_and_keeps_the_peak(trained_rm):
    cfg, out = trained_rm
    recs = metrics(out)
    assert {"loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= set(recs[0])
    evals = [r for r in recs if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "rm" and run["layout"] == "prefix_shared" and run["reference"] == "none"
    assert run["early_stopping_metric"] == "eval/accuracy"
    peak = max(evals, key=lambda r: r["eval/accuracy"])
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == pytest.approx(peak["eval/accuracy"]) and run["eval_accuracy"] == evals[-1]["eval/accuracy"]
    assert recs[0]["loss"] == pytest.approx(0.6931, abs=0.05)  # a fresh head: rewards near 0, loss near ln 2
    for folder in (out / "final", out / "best"):
        assert (folder / RECORD).is_file() and "reward-model" in (folder / "README.md").read_text()
    assert "held-out accuracy" in (out / "final" / "README.md").read_text()


@pytest.mark.e2e
def test_final_loads_as_it_is_in_another_folder(trained_rm, tmp_path):
    """final/ copied elsewhere loads with plain AutoModelForSequenceClassification (and the text-classification
    pipeline); its own forward on prompt + completion ids gives the rewards preftune reads."""
    from transformers import pipeline

    cfg, out = trained_rm
    moved = tmp_path / "elsewhere"
    shutil.copytree(out / "final", moved)
    plain = AutoModelForSequenceClassification.from_pretrained(moved).eval()
    tok = AutoTokenizer.from_pretrained(moved)
    rows = [PreferenceRow([{"role": "user", "content": "How do I keep basil fresh?"}], "Keep it in water.", "Dunno.")]
    items = tokenize(rows, tok, cfg.data, RowKind.PREFERENCE).items
    with torch.no_grad():
        own = [float(plain(input_ids=torch.tensor([items[0].prompt_ids + c])).logits[0, 0])
               for c in (items[0].chosen_ids, items[0].rejected_ids)]
    ours = score_responses(load_reward_model(str(out / "final"), "test"), [rows[0].prompt] * 2,
                           [rows[0].chosen, rows[0].rejected])
    assert ours == pytest.approx(own, abs=1e-5)
    clf = pipeline("text-classification", model=str(moved), tokenizer=str(moved))
    assert 0 < clf("Keep it in water.")[0]["score"] < 1


@pytest.mark.e2e
def test_resume_continues_the_same_trajectory(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    from preftune.model import resolve_model

    tiny = resolve_model("tiny")
    straight = rm_cfg(tmp_path / "a", "rm.save_every=3", "rm.eval_every=0")
    run_stage(straight, "rm", Path(straight.output_dir), tiny)
    resumed = rm_cfg(tmp_path / "b", "rm.save_every=3", "rm.eval_every=0")
    out = Path(resumed.output_dir)
    run_stage(resumed, "rm", out, tiny, stop_at=3)
    assert run_stage(resumed, "rm", out, tiny, resume=True)["resumed_from"] == 3
    a, b = ([m["loss"] for m in metrics(Path(c.output_dir))] for c in (straight, resumed))
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


@pytest.mark.e2e
def test_a_round_on_open_ended_rows_with_a_preftune_reward_model(trained_rm, tmp_path, monkeypatch):
    """The hand-written rows have no checkable answer (the rule reward refuses them); the reward model from
    ``preftune rm`` scores every sample as it is, offline, and the round trains on its pairs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    from preftune.model import resolve_model
    from preftune.rounds import run_rounds

    _, rm = trained_rm
    cfg = rm_cfg(tmp_path, "rounds.n=1", "rounds.prompts=4", "rounds.samples=3", "rounds.max_new_tokens=4",
                 "rounds.temperature=1.5", "rounds.reward=reward_model", f"rounds.reward_model={rm / 'final'}",
                 "dpo.batch_size=2", "dpo.eval_batch_size=8", "lora.enabled=true", "lora.r=4")
    (rec,) = run_rounds(cfg, tmp_path / "run", resolve_model("tiny"))
    samples = [json.loads(x) for x in (tmp_path / "run/rounds/round-1/samples.jsonl").read_text().splitlines()]
    assert all(s["meta"].get("check") is None for s in samples)  # open-ended rows only
    assert rec["scored"] == 12 and rec["pairs"] >= 1 and rec["stage"]["pairs_seen"] > 0


@pytest.mark.e2e
def test_bon_writes_the_highest_reward_samples(tmp_path, monkeypatch):
    """A hand-made reward (the number of letters 'e') picks each prompt's best sample; a prompt whose
    samples all have the same count is left out and counted."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    from preftune.bon import run_bon
    from preftune.model import resolve_model

    cfg = rm_cfg(tmp_path, "rounds.samples=4", "rounds.max_new_tokens=6", "rounds.temperature=1.5", "bon.prompts=5",
                 "rounds.reward=reward_model", "rounds.reward_model=unused")
    hand = lambda rows, responses: [[float(s.count("e")) for s in g] for g in responses]  # noqa: E731
    out = tmp_path / "bon"
    summary = run_bon(cfg, resolve_model("tiny"), out, reward_fn=hand)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    assert len(samples) == summary["prompts"] == 5
    tied = [s for s in samples if len({x["reward"] for x in s["samples"]}) == 1]
    assert summary["all_tied"] == len(tied) and summary["sft_rows"] == len(sft) == 5 - len(tied)
    by_prompt = {json.dumps(s["prompt"]): s for s in samples}
    for row in sft:
        group = by_prompt[json.dumps(row["prompt"])]["samples"]
        assert row["completion"].count("e") == max(x["response"].count("e") for x in group)
    assert summary["rewards"]["scored"] == 20 and (out / "pairs.jsonl").is_file()
    from preftune.cli import main

    assert main(["data", "inspect", str(out / "sft.jsonl"), "--sft", "--json"]) == 0


@pytest.mark.e2e
def test_the_reward_model_judges_and_reports_its_calibration(trained_rm, tmp_path, monkeypatch, capsys):
    from preftune.cli import main
    from preftune.eval.judges import judge_pairs, make_judge

    cfg, rm = trained_rm
    w = load_config(None, ["eval.winrate.judge=reward_model", f"eval.winrate.judge_model={rm}"]).eval.winrate
    judge = make_judge(w)
    prompt = [{"role": "user", "content": "How do I keep basil fresh?"}]
    items = [{"prompt": prompt, "model": "Keep it in a glass of water.", "reference": "Dunno.", "meta": {}},
             {"prompt": prompt, "model": "Same text.", "reference": "Same text.", "meta": {}}]
    run = judge_pairs(judge, items, None)
    r = [score_responses(judge._loaded, [prompt] * 2, [i["model"], i["reference"]]) for i in items[:1]][0]
    assert run.results[0]["score"] == (1.0 if r[0] > r[1] else 0.0)
    assert run.results[1]["score"] == 0.5  # equal rewards: a tie, counted as half
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: tiny\noutput_dir: {tmp_path / 'ev'}\ndata: {{source: {HAND}, max_rows: 32, "
                      "test_size: 0.25, max_length: 96, max_prompt_length: 48}\n")
    assert main(["eval", "rm", str(config), "--model", str(rm)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path):
    from preftune.embedded import tiny_llama

    tiny_llama(tmp_path / "causal")
    with pytest.raises(PreftuneError, match="eval.winrate.judge_model: .* is not a sequence-classification model"):
        load_reward_model(str(tmp_path / "causal"), "eval.winrate.judge_model")
    with pytest.raises(ConfigError, match="rm.center_rewards_coefficient"):
        load_config(None, ["rm.center_rewards_coefficient=-1"])


@pytest.mark.e2e
def test_the_pipeline_trains_its_reward_model_first_and_uses_it(tmp_path, monkeypatch):
    """One config: SFT, then a LoRA reward model from the SFT model (saved merged), best-of-n, an on-policy
    round scored by that reward model and the win-rate judged by it, none of them naming a path."""
    from preftune.cli import main
    from preftune.pipeline import QUICKSTART

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["pipeline", str(QUICKSTART), "model=tiny", f"output_dir={out}", "data.max_rows=16",
                 "data.max_eval_rows=6", "sft.max_steps=2", "rm.enabled=true", "rm.max_steps=2", "bon.enabled=true",
                 "bon.prompts=3", "rounds.n=1", "rounds.prompts=3", "rounds.samples=3", "rounds.max_new_tokens=4",
                 "rounds.temperature=1.5", "rounds.reward=reward_model", "eval.winrate.judge=reward_model",
                 "eval.winrate.per_category=1", "eval.winrate.max_new_tokens=4", "eval.heldout.enabled=false",
                 "eval.tasks=[]", "eval.kl=false"]) == 0
    rm = out / "rm"
    assert (rm / "final" / "config.json").is_file() and not (rm / "final" / "adapter_config.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(rm / "final").config.num_labels == 1
    assert {"accuracy", "calibration", "rule_agreement"} <= set(json.loads((rm / "eval_rm.json").read_text()))
    assert json.loads((out / "bon" / "summary.json").read_text())["reward_model"] == str(rm.resolve())
    rec = json.loads((out / "rounds" / "round-1" / "round.json").read_text())
    assert rec["reward"] == "reward_model" and rec["scored"] == 9
    models = json.loads((out / "eval" / "eval.json").read_text())["models"]
    judged = (tmp_path / "cache" / "eval" / "judgments" / "reward_model.jsonl").read_text().splitlines()
    assert judged and all(json.loads(x)["judge"] == "reward_model" for x in judged)
    assert 0 <= models["sft"]["winrate"]["winrate"] <= 1 and models["sft"]["winrate"]["invalid_judgments"] == 0
    assert set(json.loads((out / "timings.json").read_text())) >= {"sft", "rm", "bon", "rounds", "eval"}
