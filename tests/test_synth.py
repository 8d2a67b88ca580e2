"""The generated preference pairs, the hand-written pairs and the shipped embedded files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from preftune.cli import main as cli_main
from preftune.data import synth
from preftune.data.formats import detect_format, standard
from preftune.errors import DataError
from preftune.eval.checks import check

RESOURCES = synth.resources_dir()


@pytest.fixture(scope="module")
def rows():
    return synth.generate(480, seed=0)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_rows_other_seed_other_rows(rows):
    assert synth.generate(480, seed=0) == rows
    other = synth.generate(480, seed=1)
    assert other != rows
    assert len({r["prompt"] for r in other} & {r["prompt"] for r in rows}) < 240


def test_every_category_and_kind_of_flaw_is_covered(rows):
    counts = Counter(r["meta"]["category"] for r in rows)
    assert counts == {c: 80 for c in synth.CATEGORIES}
    flaws = Counter(r["meta"]["flaw"] for r in rows)
    assert set(flaws) == {"wrong", "format", "unhelpful", "rude"}
    assert flaws["wrong"] + flaws["format"] > len(rows) / 2  # mostly wrong answers
    assert {r["meta"]["check"] for r in rows} == {"number", "list_order", "contains", "uppercase", "json_answer",
                                                  "word_count", "comma_list"}


def test_rows_are_standard_short_and_distinct(rows):
    assert len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "meta"}
        assert r["chosen"] != r["rejected"]
        assert r["meta"]["source"] == "synth" and isinstance(r["meta"]["answer"], str)
        assert len(r["prompt"].split()) <= 25 and len(r["chosen"].split()) <= 20
        assert len(r["rejected"].split()) <= 20
        assert standard(r).chosen == r["chosen"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_checker_passes_every_chosen_and_fails_every_rejected(seed):
    """Every rejected reply of a synth row is wrong, off-format, unhelpful or rude without stating the
    answer, so the rule judge must fail all of them and pass all the chosen ones."""
    for r in synth.generate(480, seed):
        assert check(r["meta"], r["chosen"]) is True, r
        assert check(r["meta"], r["rejected"]) is False, r


def test_examples_of_chosen_and_rejected():
    rows = synth.generate(60, seed=5)
    arith = next(r for r in rows if r["meta"]["category"] == "arithmetic" and r["meta"]["flaw"] == "wrong")
    assert arith["meta"]["answer"] in arith["chosen"] and arith["meta"]["answer"] not in arith["rejected"].split()
    sort = next(r for r in rows if r["meta"]["check"] == "list_order")
    assert sort["chosen"].rstrip(".").endswith(sort["meta"]["answer"])


def test_generate_refuses_more_prompts_than_the_tables_hold():
    with pytest.raises(DataError, match="could not draw a new"):
        synth.generate(60_000, seed=0)


def test_hand_pairs_count_categories_and_chat_format():
    recs = read_jsonl(RESOURCES / synth.HAND_FILE)
    assert len(recs) >= 120
    assert Counter(r["meta"]["category"] for r in recs).keys() == {"helpful", "harmless"}
    assert min(Counter(r["meta"]["category"] for r in recs).values()) >= 40
    assert any(r["chosen"][0]["role"] == "system" for r in recs)
    assert any(sum(m["role"] == "assistant" for m in r["chosen"]) > 1 for r in recs)  # multi-turn
    for r in recs:
        assert r["meta"]["source"] == "hand"
        assert r["chosen"][:-1] == r["rejected"][:-1] and r["chosen"][-1]["role"] == "assistant"
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"]
        assert len(r["chosen"][-1]["content"].split()) <= 60 and len(r["rejected"][-1]["content"].split()) <= 60
    assert len({json.dumps(r["chosen"][:-1]) for r in recs}) == len(recs)  # no repeated prompt


def test_hand_pair_conversion_and_errors():
    rec = {"chosen": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "bad"}],
           "meta": {"category": "helpful", "source": "hand"}}
    row = synth.hand_to_standard(rec)
    assert row == {"prompt": rec["chosen"][:2], "chosen": "good", "rejected": "bad", "meta": rec["meta"]}
    bad = dict(rec, rejected=[{"role": "user", "content": "other"}, {"role": "assistant", "content": "bad"}])
    with pytest.raises(DataError, match="row 7, field 'rejected'.*share"):
        synth.hand_to_standard(bad, "f.jsonl", 7)
    with pytest.raises(DataError, match="field 'chosen'.*assistant"):
        synth.hand_to_standard(dict(rec, chosen=rec["chosen"][:2]), "f.jsonl", 1)


def test_split_holds_out_a_fifth_of_each_category():
    rows = [{"meta": {"category": c}, "i": i} for i, c in enumerate(["a"] * 50 + ["b"] * 10)]
    train, test = synth.split(rows)
    assert Counter(r["meta"]["category"] for r in test) == {"a": 10, "b": 2}
    assert sorted(r["i"] for r in train + test) == list(range(60))
    assert [r["i"] for r in test] == sorted(r["i"] for r in test)
    assert synth.split(rows) == (train, test)


def test_shipped_files_are_exactly_build_embedded_output(tmp_path):
    train, test = synth.build_embedded(tmp_path)
    assert train.read_bytes() == (RESOURCES / "prefs_train.jsonl").read_bytes()
    assert test.read_bytes() == (RESOURCES / "prefs_test.jsonl").read_bytes()


def test_shipped_files_size_split_and_one_format():
    train, test = read_jsonl(RESOURCES / "prefs_train.jsonl"), read_jsonl(RESOURCES / "prefs_test.jsonl")
    assert len(train) + len(test) >= 600 and 0.15 < len(test) / (len(train) + len(test)) < 0.25
    assert {r["meta"]["category"] for r in test} == set(synth.CATEGORIES) | {"helpful", "harmless"}
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in test}
    for rec in train + test:
        assert detect_format(rec, "preference", rec) == "standard"
        assert isinstance(rec["prompt"], str) == (rec["meta"]["source"] == "synth")


def test_cli_synth_writes_rows_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "sub" / "synth.jsonl"
    assert cli_main(["data", "synth", "--n", "50", "--seed", "3", "--out", str(out)]) == 0
    assert read_jsonl(out) == synth.generate(50, 3)
    printed = capsys.readouterr().out
    assert "arithmetic" in printed and "total" in printed and " 50" in printed
