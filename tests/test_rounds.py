"""On-policy rounds: pairs from scored samples (ties skipped and counted), a round end to end on the
tiny model with the rule reward, resume of a killed round, a reward-model scorer, the judge reward
over real HTTP against preftune's own serve, the errors, and the KL against a hand-computed value."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import loss_terms
from preftune.config import ConfigError
from preftune.config.validate import load_config
from preftune.data.rows import PreferenceRow
from preftune.errors import PreftuneError
from preftune.eval.checks import check
from preftune.rounds import (
    build_pairs,
    judge_scores,
    prompt_pool,
    reward_model_scores,
    round_config,
    rule_scores,
    run_rounds,
)


def _rows_file(path, n=12, answers=("1", "2", "3")):
    """Checkable rows (word counts) that a random tiny model passes now and then."""
    with open(path, "w") as f:
        for i in range(n):
            a = answers[i % len(answers)]
            f.write(json.dumps({"prompt": f"Reply with exactly {a} word(s), please ({i}).",
                                "chosen": " ".join(["yes"] * int(a)), "rejected": "no no no no",
                                "meta": {"check": "word_count", "answer": a}}) + "\n")
    return path


def _cfg(tmp_path, *extra, rows=None):
    data = rows or _rows_file(tmp_path / "rows.jsonl")
    return load_config(None, ["model=tiny", f"output_dir={tmp_path / 'run'}", f"data.source={data}",
                              "data.test_size=0.25", "lora.r=4", "rounds.n=1", "rounds.prompts=6", "rounds.samples=4",
                              "rounds.max_new_tokens=3", "rounds.temperature=1.5", "dpo.batch_size=2",
                              "dpo.eval_batch_size=4", "eval.batch_size=8", *extra])


def test_pairs_take_best_and_worst_and_count_what_they_skip():
    rows = [PreferenceRow(f"q{i}", "c", "r", {"id": i}) for i in range(4)]
    responses = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["same", "same", "x"]]
    scores = [[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [None, 0.0, None], [1.0, 0.0, 0.5]]
    pairs, counts = build_pairs(rows, responses, scores, round_no=2)
    # row 1 is all ties, row 2 has one scored sample, row 3's best and worst are the same text
    assert counts == {"ties": 1, "unscored": 1, "identical": 1}
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.prompt, p.chosen, p.rejected) == ("q0", "b", "a")
    assert p.meta == {"id": 0, "round": 2, "chosen_score": 1.0, "rejected_score": 0.0}


def test_a_rule_reward_draws_only_checkable_rows_and_counts_the_rest():
    checkable_row = PreferenceRow("q", "c", "r", {"check": "number", "answer": "4"})
    plain = PreferenceRow("q2", "c", "r", {"category": "helpful"})
    none_left_out = {"heldout_prompts_left_out": 0}
    assert prompt_pool([checkable_row, plain, plain], "rule") == ([checkable_row],
                                                                  none_left_out | {"unchecked_rows_left_out": 2})
    assert prompt_pool([checkable_row, plain], "judge") == ([checkable_row, plain],
                                                           none_left_out | {"unchecked_rows_left_out": 0})
    with pytest.raises(PreftuneError, match="none of the 2 training rows has one"):
        prompt_pool([plain, plain], "rule")
    with pytest.raises(PreftuneError, match="no training prompts"):
        prompt_pool([], "judge")


def test_a_prompt_that_is_also_held_out_is_never_drawn():
    """Several pairs per prompt can put one prompt on both sides of the split: such rows leave the
    pool (counted), so no round trains on a prompt the held-out figures are measured on."""
    shared = [{"role": "user", "content": "What is 2 + 2?"}]
    leaked = PreferenceRow(shared, "4", "5", {"check": "number", "answer": "4"})
    fresh = PreferenceRow("What is 3 + 3?", "6", "7", {"check": "number", "answer": "6"})
    heldout = [PreferenceRow([dict(m) for m in shared], "It is 4.", "It is 22.", {})]
    pool, left_out = prompt_pool([leaked, fresh, leaked], "rule", heldout)
    assert pool == [fresh] and left_out == {"heldout_prompts_left_out": 2, "unchecked_rows_left_out": 0}
    with pytest.raises(PreftuneError, match="every training prompt is also a held-out prompt"):
        prompt_pool([leaked], "judge", heldout)


def test_rule_reward_needs_checkable_rows():
    rows = [PreferenceRow("q", "c", "r", {"check": "number", "answer": "4"}), PreferenceRow("q2", "c", "r", {})]
    with pytest.raises(PreftuneError, match="1 of the 2 drawn prompts have none"):
        rule_scores(rows, [["4", "5"], ["x", "y"]])
    assert rule_scores(rows[:1], [["it is 4", "5"]]) == [[1.0, 0.0]]


@pytest.mark.e2e
def test_a_round_end_to_end_then_resume(tmp_path, monkeypatch, caplog):
    """Sample, score by rule, pair, train, write; the counts add up and every pair is right by the
    check. A second call redoes nothing finished; a killed round 2 restarts cleanly."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    from preftune.model import resolve_model

    start = resolve_model("tiny")
    (rec,) = run_rounds(cfg, tmp_path / "run", start)
    rd = tmp_path / "run" / "rounds" / "round-1"
    samples = [json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (rd / "pairs.jsonl").read_text().splitlines()]
    assert rec["prompts"] == len(samples) == 6 and rec["samples"] == 24 == sum(len(s["samples"]) for s in samples)
    assert rec["pairs"] + rec["ties"] + rec["unscored"] + rec["identical"] == rec["prompts"]
    assert rec["pairs"] == len(pairs) >= 1
    for p in pairs:  # chosen passes the check, rejected fails it
        assert check(p["meta"], p["chosen"]) and not check(p["meta"], p["rejected"])
    heldout_prompts = {json.loads(x)["prompt"] for x in (rd / "heldout.jsonl").read_text().splitlines()}
    assert heldout_prompts and not heldout_prompts & {s["prompt"] for s in samples}  # never a held-out prompt
    flat = [x["score"] for s in samples for x in s["samples"]]
    assert rec["reward_mean"] == pytest.approx(sum(flat) / len(flat))
    run = json.loads((rd / "dpo" / "run.json").read_text())
    assert run["pairs_seen"] == rec["stage"]["pairs_seen"] > 0 and run["train_rows"] == len(pairs)
    assert (rd / "dpo" / "final" / "adapter_config.json").is_file() and (rd / "round.json").is_file()
    assert "eval/rewards/accuracies" in rec
    # the pairs file is a standard preference file that data inspect reads
    from preftune.cli import main

    assert main(["data", "inspect", str(rd / "pairs.jsonl"), "--json"]) == 0

    # resume: round 1 is read back (not redone); a half-written round 2 is removed and run again
    stamp = (rd / "round.json").stat().st_mtime_ns
    r2 = tmp_path / "run" / "rounds" / "round-2"
    r2.mkdir()
    (r2 / "samples.jsonl").write_text("{half a line")
    cfg2 = _cfg(tmp_path, "rounds.n=2", rows=tmp_path / "rows.jsonl")
    import logging

    logger = logging.getLogger("preftune")  # preftune's logger does not propagate once the CLI set it up
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="preftune"):
            recs = run_rounds(cfg2, tmp_path / "run", start)
    finally:
        logger.removeHandler(caplog.handler)
    assert [r["round"] for r in recs] == [1, 2] and recs[0] == rec
    assert (rd / "round.json").stat().st_mtime_ns == stamp
    assert "round 1: finished earlier" in caplog.text and "starting the round again" in caplog.text
    assert json.loads((r2 / "samples.jsonl").read_text().splitlines()[0])["samples"]
    assert recs[1]["start_model"] == rec["final_model"]


def test_zero_pairs_says_why(tmp_path, monkeypatch):
    """Every sample fails an impossible check: all ties, and the error says so."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": "zqxjv", "rejected": "no",
                                "meta": {"check": "contains", "answer": "zqxjvwk"}}) + "\n")
    from preftune.model import resolve_model

    with pytest.raises(PreftuneError, match=r"built 0 pairs from 6 prompts \(6 ties\)"):
        run_rounds(_cfg(tmp_path, rows=rows), tmp_path / "run", resolve_model("tiny"))


def testround_config_errors():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rounds.samples=1", "rounds.reward=reward_model", "rounds.temperature=0",
                           "rounds.reference=sft", "lora.enabled=false"])
    text = str(e.value)
    for key in ("rounds.samples", "rounds.reward_model", "rounds.temperature", "rounds.reference"):
        assert key in text
    with pytest.raises(ConfigError, match=r"rounds\.loss.*nosuchloss"):
        load_config(None, ["rounds.loss=nosuchloss"])


def test_the_rounds_stage_takes_the_rounds_loss_lr_and_epochs(tmp_path):
    """RPO in the rounds (DPO plus an NLL term on the chosen samples) while the offline stage keeps dpo.loss."""
    cfg = load_config(None, ["dpo.loss=sigmoid", "dpo.lr=1e-4", "rounds.lr=4e-4", "rounds.epochs=3",
                             'rounds.loss=[{"name": "sigmoid"}, {"name": "sft", "weight": 1.0}]'])
    stage = round_config(cfg, tmp_path).dpo
    assert [(t.name, t.weight) for t in loss_terms.terms(stage)] == [("sigmoid", 1.0), ("sft", 1.0)]
    assert (stage.lr, stage.epochs, stage.eval_every, stage.early_stopping) == (4e-4, 3, 0, False)
    assert [t.name for t in loss_terms.terms(cfg.dpo)] == ["sigmoid"]
    assert round_config(load_config(None, []), tmp_path).dpo.loss == "sigmoid"  # null: dpo.loss


def _reward_model(path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_reward_model_scorer(tmp_path, tokenizer, tiny_model_dir):
    model = _reward_model(tmp_path / "rm", tokenizer).eval()
    rows = [PreferenceRow([{"role": "user", "content": "Hi?"}], "c", "r"), PreferenceRow("Plain prompt", "c", "r")]
    responses = [["Hello there.", "Go away"], ["One", "Two words here"]]
    scores = reward_model_scores(str(tmp_path / "rm"), rows, responses, batch_size=3)
    # each text scored alone (no padding) by the same classifier
    texts = [tokenizer.apply_chat_template([*rows[0].prompt, {"role": "assistant", "content": s}], tokenize=False)
             for s in responses[0]] + [f"Plain prompt\n{s}" for s in responses[1]]
    with torch.no_grad():
        alone = [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]
    assert [x for g in scores for x in g] == pytest.approx(alone, abs=1e-5)
    with pytest.raises(PreftuneError, match="not a sequence-classification model"):
        reward_model_scores(str(tiny_model_dir), rows, responses)


@pytest.mark.e2e
def test_judge_reward_over_http_against_preftune_serve(tmp_path, monkeypatch):
    """The openai judge behind ``preftune serve``: a served model that always answers "A" (one token)
    prefers whichever response is shown first, so both orders split and every sample scores 0.5."""
    from preftune.embedded import tiny_llama
    from preftune.serve import background, create_app

    model, tok = tiny_llama(seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[tok.convert_tokens_to_ids("A")] = 10.0
    model.lm_head = head
    rows = [PreferenceRow("What is 2+2?", "4", "5", {}), PreferenceRow("Name a colour.", "red", "dog", {})]
    responses = [["four", "5"], ["blue", "cat"]]
    with background(create_app(model, tok, "judge", None, max_tokens_cap=1)) as url:
        cfg = load_config(None, ["eval.winrate.judge=openai", "eval.winrate.judge_model=judge",
                                 f"eval.winrate.base_url={url}"])
        scores = judge_scores(cfg, rows, responses, tmp_path / "judgments.jsonl")
    assert scores == [[0.5, 0.5], [0.5, 0.5]]
    assert len((tmp_path / "judgments.jsonl").read_text().splitlines()) == 8  # 4 samples x 2 orders
    assert build_pairs(rows, responses, scores, 1)[1]["ties"] == 2


def test_kl_against_a_hand_computed_value(tokenizer):
    """token_kl against KL summed by hand, one completion position at a time, from separate forwards
    without padding; the batch pads prompts and completions of different lengths."""
    from preftune.data.rows import SFTRow
    from preftune.data.tokenize import tokenize_sft
    from preftune.embedded import tiny_llama
    from preftune.eval.kl import token_kl

    policy, _ = tiny_llama(seed=1)
    reference, _ = tiny_llama(seed=2)
    rows = [PreferenceRow("Say hi.", "Hi there, friend.", "No."),
            PreferenceRow([{"role": "user", "content": "Count to three."}], "One, two, three.", "Four."),
            PreferenceRow("A story, please, about the sea and a cat.", "Once upon a time a small cat lived by the sea.", "")]
    got = token_kl(policy.eval(), reference.eval(), tokenizer, rows, 64, 32, batch_size=3)
    total, n = 0.0, 0
    for r in rows:
        t = tokenize_sft(SFTRow(r.prompt, r.chosen), tokenizer, 64, 32)
        ids = t.prompt_ids + t.completion_ids
        for pos in range(len(t.prompt_ids), len(ids)):
            ctx = torch.tensor([ids[:pos]])
            with torch.no_grad():
                p = torch.softmax(policy(ctx).logits[0, -1].double(), -1)
                q = torch.softmax(reference(ctx).logits[0, -1].double(), -1)
            total += float((p * (p.log() - q.log())).sum())
            n += 1
    assert got["tokens"] == n and got["rows"] == 3
    assert got["kl"] == pytest.approx(total / n, rel=1e-4)
    same = token_kl(policy, policy, tokenizer, rows, 64, 32)
    assert abs(same["kl"]) < 1e-6


@pytest.mark.e2e
def test_the_pipeline_with_rounds_never_evaluates_on_a_trained_prompt(tmp_path, monkeypatch, capsys):
    """``preftune pipeline`` on the quickstart config with two on-policy rounds (tiny model): the earlier
    round is evaluated briefly (generations and KL), the last in full and against SFT, the headline
    carries the per-round figures, and no prompt of the evaluation was trained on by any stage or round."""
    from preftune.cli import main
    from preftune.data.sources import load_rows
    from preftune.pipeline import QUICKSTART

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    rows = _rows_file(tmp_path / "rows.jsonl", n=16)
    out = tmp_path / "qs"
    args = ["model=tiny", f"output_dir={out}", f"data.source={rows}", "data.test_size=0.25", "data.max_rows=null",
            "data.max_eval_rows=null", "lora.r=4", "sft.max_steps=2", "dpo.max_steps=2", "dpo.eval_every=2",
            "dpo.batch_size=2", "eval.winrate.max_new_tokens=4", "eval.heldout.max_chunks=2", "eval.tasks_limit=2",
            "rounds.n=2", "rounds.prompts=6", "rounds.samples=4", "rounds.max_new_tokens=3", "rounds.temperature=1.5"]
    assert main(["pipeline", str(QUICKSTART), *args]) == 0
    printed = capsys.readouterr().out
    assert "on-policy rounds:" in printed and "round 1:" in printed and "round 2:" in printed
    assert "round-2-sft: checked accuracy" in printed

    results = json.loads((out / "eval" / "eval.json").read_text())
    models = results["models"]
    assert set(models) == {"base", "sft", "round-1", "round-2"}  # the demo: SFT, then DPO by rounds
    assert {"winrate", "checked", "kl"} <= set(models["round-1"]) and not {"heldout", "tasks", "rewards"} & set(models["round-1"])
    assert {"winrate", "checked", "kl", "heldout", "tasks", "rewards"} <= set(models["round-2"])
    assert "rounds" in json.loads((out / "timings.json").read_text())

    cfg = load_config(QUICKSTART, args)
    train, heldout, _ = load_rows(cfg.data, "preference", cfg.seed)
    trained = {json.dumps(r.prompt) for r in train}
    for k in (1, 2):
        pairs = (out / "rounds" / f"round-{k}" / "pairs.jsonl").read_text().splitlines()
        trained |= {json.dumps(json.loads(p)["prompt"]) for p in pairs}
    evaluated = {json.dumps(json.loads(x)["prompt"]) for name in models
                 for x in (out / "eval" / f"samples-{name}.jsonl").read_text().splitlines()}
    assert evaluated and evaluated <= {json.dumps(r.prompt) for r in heldout}
    assert not evaluated & trained
