"""Cross-dataset evaluation (``eval.datasets``): every model is also measured on each extra
preference source's held-out rows, each read in its own format, with the suite's own entry
functions; the figures land in ``eval.json`` under ``datasets: {name: {model: {...}}}``."""

from __future__ import annotations

import json

import pytest

from preftune.config.validate import config_from_dict
from preftune.data.sources import load_rows
from preftune.errors import PreftuneError
from preftune.eval.checks import check
from preftune.eval.suite import evaluate_models

CHECKABLE = {"check": "number", "answer": "4"}


def hh_record(i: int) -> dict:
    """An Anthropic-HH transcript pair whose extra columns make it checkable by the rule judge."""
    prompt = f"\n\nHuman: What is 2 + 2? (hh {i})\n\nAssistant:"
    return {"chosen": prompt + " 4", "rejected": prompt + " 5"} | CHECKABLE


def shp_record(i: int) -> dict:
    """A Stanford-SHP pair (A preferred, score ratio 3): nothing the rule judge can check."""
    return {"history": f"Name a colour. (shp {i})", "human_ref_A": "Blue.", "human_ref_B": "Dog.",
            "labels": 1, "score_A": 6, "score_B": 2}


def write_jsonl(path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def setup(tmp_path, monkeypatch, tiny_model_dir, tuned_dir):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    own = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"What is 2 + 2? ({i})", "chosen": "4", "rejected": "5",
                                                  "meta": CHECKABLE} for i in range(8)])
    # HH as a folder with its own test split (3 rows held out); SHP one file, 25% carved off (3 of 12)
    write_jsonl(tmp_path / "hh" / "train.jsonl", [hh_record(i) for i in range(6)])
    write_jsonl(tmp_path / "hh" / "test.jsonl", [hh_record(100 + i) for i in range(3)])
    shp = write_jsonl(tmp_path / "shp.jsonl", [shp_record(i) for i in range(12)])
    raw = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"source": own, "test_size": 0.5, "max_length": 64, "max_prompt_length": 32},
           "eval": {"batch_size": 4, "tasks": [], "kl": False, "heldout": {"enabled": False},
                    "winrate": {"judge": "rule", "per_category": 8, "max_new_tokens": 4},
                    "datasets": [
                        {"name": "hh", "source": str(tmp_path / "hh"), "format": "hh", "max_length": 64,
                         "max_prompt_length": 32},
                        {"name": "shp", "source": shp, "test_size": 0.25, "max_length": 48, "max_prompt_length": 24},
                        {"name": "own", "source": own, "test_size": 0.5, "max_length": 64, "max_prompt_length": 32},
                    ]}}
    return config_from_dict(raw), {"base": str(tiny_model_dir), "tuned": str(tuned_dir)}, tmp_path


def test_every_model_is_measured_on_every_dataset(setup):
    cfg, models, tmp = setup
    out = evaluate_models(cfg, models, tmp / "eval", reference_for={"tuned": models["base"]})
    on_disk = json.loads((tmp / "eval" / "eval.json").read_text())["datasets"]
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(out["datasets"], sort_keys=True)  # NaN != NaN
    assert list(out["datasets"]) == ["hh", "shp", "own"]
    for name in ("hh", "shp", "own"):
        assert list(out["datasets"][name]) == ["base", "tuned"]
        assert "rewards" not in out["datasets"][name]["base"]  # no reference for the base

    hh, shp = out["datasets"]["hh"], out["datasets"]["shp"]
    # HH: its test split, read as transcripts; every row checkable, so the rule judge rules on all 3
    assert hh["tuned"]["rewards"]["n"] == 3 and 0 <= hh["tuned"]["rewards"]["rewards/accuracies"] <= 1
    for model in ("base", "tuned"):
        w = hh[model]["winrate"]
        assert w["vs"] == "chosen" and w["n"] == 3 and w["invalid"] == 0
        samples = [json.loads(x) for x in (tmp / "eval" / "datasets" / "hh" / f"samples-{model}.jsonl")
                   .read_text().splitlines()]
        assert [s["prompt"][-1]["content"] for s in samples] == [f"What is 2 + 2? (hh {100 + i})" for i in range(3)]
        correct = sum(bool(check(s["meta"], s["response"])) for s in samples)
        assert hh[model]["checked"]["n"] == 3 and hh[model]["checked"]["correct"] == correct
    # SHP: 3 carved-off rows, nothing checkable: every judgment invalid and no checked accuracy
    assert shp["tuned"]["rewards"]["n"] == 3
    for model in ("base", "tuned"):
        assert shp[model]["winrate"]["invalid"] == 3 and "checked" not in shp[model]
    _, held_out, _ = load_rows(cfg.eval.datasets[1], "preference", cfg.seed)
    samples = (tmp / "eval" / "datasets" / "shp" / "samples-tuned.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in samples] == [r.prompt for r in held_out]

    # the run's own data named as an extra dataset: the same held-out rows, the same figures
    own = out["datasets"]["own"]
    assert own["tuned"]["rewards"] == out["models"]["tuned"]["rewards"]
    for model in ("base", "tuned"):
        mine, theirs = own[model]["winrate"], out["models"][model]["winrate"]
        tally = ("calls", "requests", "cache_hits")
        assert {k: v for k, v in mine.items() if k not in tally} == {k: v for k, v in theirs.items() if k not in tally}
        assert (mine["requests"], mine["cache_hits"]) == (0, 8)  # 4 rows x 2 orders, judged once
        assert own[model]["checked"] == out["models"][model]["checked"]


def test_no_datasets_no_section(setup):
    cfg, models, tmp = setup
    cfg.eval.datasets = []
    cfg.eval.winrate.enabled = False
    out = evaluate_models(cfg, {"base": models["base"]}, tmp / "eval")
    assert "datasets" not in out


def test_a_dataset_without_held_out_rows_is_named(setup, tmp_path):
    cfg, models, tmp = setup
    cfg.eval.datasets[1].test_size = 0.0
    with pytest.raises(PreftuneError, match=r"eval\.datasets\[1\] \(shp\): no held-out rows .*test_size"):
        evaluate_models(cfg, {"base": models["base"]}, tmp / "eval")
