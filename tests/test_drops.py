"""The drop policy on a real-HH-shaped file: data-quality problems are counted drops under the default
config, structural ones still stop, ``data.max_drop_fraction`` bounds the bad share, and the stage's
data loading logs the summary before training (read = kept + dropped throughout)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from preftune.config import Config, DataConfig
from preftune.data import drops
from preftune.data.formats import RowError
from preftune.data.prepare import tokenize_splits
from preftune.data.sources import load_rows
from preftune.data.tokenize import RowKind
from preftune.errors import DataError


def hh(i: int, chosen: str | None = None, rejected: str | None = None, prompt: str | None = None) -> dict:
    head = prompt if prompt is not None else f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: Let me think.\n\nHuman: Go on."
    return {"chosen": f"{head}\n\nAssistant: {f'It is {2 * i}.' if chosen is None else chosen}",
            "rejected": f"{head}\n\nAssistant: {'No idea.' if rejected is None else rejected}"}


def real_hh_shaped(path: Path, n_good: int = 60) -> Path:
    """Good rows plus what real HH has: an empty final reply (chosen and rejected), a rejected
    transcript whose prompt differs from chosen's, and chosen == rejected."""
    records = [hh(i) for i in range(n_good)]
    records.insert(5, hh(5, chosen=""))
    records.insert(9, hh(9, rejected="  "))
    mismatch = hh(11)
    mismatch["rejected"] = "\n\nHuman: Something else entirely?\n\nAssistant: No idea."
    records.insert(13, mismatch)
    records.insert(20, hh(20, chosen="Same.", rejected="Same."))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))


def test_real_hh_shaped_file_runs_under_the_default_config(tmp_path, tokenizer):
    f = real_hh_shaped(tmp_path / "hh.jsonl", n_good=120)
    data = DataConfig(source=str(f), format="hh")  # on_error and max_drop_fraction at their defaults
    train_rows, test_rows, read = load_rows(data, "preference", seed=0)
    assert read.dropped == {"empty_completion": 2, "prompt_mismatch": 1}
    assert read.rows_read == 124 == read.rows_kept + 3
    train, test, report = tokenize_splits(train_rows, test_rows, read, tokenizer, data, RowKind.PREFERENCE)
    account = report["drops"]
    assert account["dropped"] == {"chosen_equals_rejected": 1, "empty_completion": 2, "prompt_mismatch": 1}
    assert account["rows_read"] == 124 == account["rows_kept"] + sum(account["dropped"].values())
    assert account["rows_kept"] == len(train) + len(test) == 120
    assert account["bad_fraction"] == pytest.approx(4 / 124)  # 3.2%: under the 5% default


def test_max_drop_fraction_stops_with_reasons_and_counts(tmp_path, tokenizer):
    f = real_hh_shaped(tmp_path / "hh.jsonl", n_good=60)
    rows = load_rows(DataConfig(source=str(f)), "preference", seed=0)
    with pytest.raises(DataError) as e:  # 4 of 64 is over the 5% default: stop, naming every reason
        tokenize_splits(*rows, tokenizer, DataConfig(source=str(f)), RowKind.PREFERENCE)
    text = str(e.value)
    assert "4 of 64 rows (6.2%)" in text and "data.max_drop_fraction=0.05" in text
    assert "empty_completion=2" in text and "prompt_mismatch=1" in text and "chosen_equals_rejected=1" in text
    tokenize_splits(*rows, tokenizer, DataConfig(source=str(f), max_drop_fraction=0.1), RowKind.PREFERENCE)


def test_structural_errors_still_stop_and_skip_counts_them(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(hh(1)) + "\n" + json.dumps({"chosen": 3, "rejected": "x"}) + "\n")
    with pytest.raises(RowError) as e:
        load_rows(DataConfig(source=str(f), format="hh"), "preference", seed=0)
    assert (e.value.row, e.value.field, e.value.reason) == (2, "chosen", "wrong_type")
    _, _, read = load_rows(DataConfig(source=str(f), format="hh", on_error="skip", test_size=0), "preference", seed=0)
    assert read.dropped == {"wrong_type": 1}


def test_filters_do_not_count_against_the_limit():
    class Read:
        rows_read, dropped = 10, {"score_ratio": 6, "max_rows": 2, "empty_completion": 1}

    class Tok:
        kept, dropped = 1, {}

    account = drops.combine(Read(), Tok())
    assert account["bad"] == 1 and account["bad_fraction"] == 0.1 and not drops.over_limit(account, 0.1)
    assert drops.summary_line(account) == ("data: read 10 rows, kept 1, left out 8 by the config (score_ratio=6, "
                                           "max_rows=2), dropped 1 (empty_completion=1); 10.0% bad data or malformed")


def test_stage_loading_logs_the_summary_and_writes_truncation(tmp_path, tokenizer, caplog):
    from preftune.train import load_stage_data

    f = real_hh_shaped(tmp_path / "hh.jsonl", n_good=120)
    cfg = Config()
    cfg.data = DataConfig(source=str(f), max_length=40, max_prompt_length=20)
    with caplog.at_level(logging.INFO, logger="preftune"):
        data = load_stage_data(cfg, "dpo", tokenizer)
    assert "data: read 124 rows, kept 120, dropped 4 (empty_completion=2, chosen_equals_rejected=1, " \
           "prompt_mismatch=1); 3.2% bad data or malformed" in caplog.text
    tok = data.report["tokenize"]
    assert tok["truncated"] == {"prompt": 120, "completion": 0}  # every templated prompt is over 20 tokens
    assert tok["lengths"]["prompt"]["max"] == 20 < tok["lengths_before_truncation"]["prompt"]["p50"]
    assert json.loads(json.dumps(data.report))["drops"]["rows_kept"] == len(data.train) + len(data.test)


def test_shp_without_scores_is_said_once(tmp_path, caplog):
    f = tmp_path / "shp.jsonl"
    rec = {"history": "Q?", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}
    f.write_text("".join(json.dumps({**rec, "post_id": i}) + "\n" for i in range(3)))
    with caplog.at_level(logging.WARNING):
        train, _, read = load_rows(DataConfig(source=str(f), test_size=0), "preference", seed=0)
    assert len(train) == 3 and read.dropped == {}
    assert read.notes == ["SHP: the data has no score columns (score_A/score_B or score_ratio), so every pair is kept"]
    assert caplog.text.count("no score columns") == 1


def hub_shp(i: int) -> dict:
    """One record with every column of stanfordnlp/SHP as the Hub has it."""
    return {"post_id": f"p{i}", "domain": "askscience_train", "upvote_ratio": 0.98, "history": f"Why {i}?",
            "c_root_id_A": f"a{i}", "c_root_id_B": f"b{i}", "created_at_utc_A": 1, "created_at_utc_B": 2,
            "score_A": 10 + i, "score_B": 2, "human_ref_A": f"Because {i}.", "human_ref_B": "Dunno.", "labels": 1,
            "seconds_difference": 1.0, "score_ratio": (10 + i) / 2}


@pytest.mark.parametrize("config, records", [
    ("hh_llama1b_lora_bf16.yaml", lambda: [hh(i) for i in range(40)] + [hh(99, chosen="")]),
    ("pythia28b_hh_qlora.yaml", lambda: [hh(i) for i in range(40)] + [hh(99, chosen="")]),
    ("shp_llama1b_lora_bf16.yaml", lambda: [hub_shp(i) for i in range(40)] + [{**hub_shp(50), "score_ratio": 1.1}]),
])
def test_shipped_configs_read_the_hub_layouts(tmp_path, tokenizer, config, records):
    """The shipped configs, pointed at a local copy in the Hub's layout (train and test files)."""
    from preftune.config.validate import load_config

    folder = tmp_path / "hub"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    cfg = load_config(Path(__file__).parents[1] / "configs" / config, [f"data.source={folder}"])
    train_rows, test_rows, read = load_rows(cfg.data, "preference", seed=0)
    assert read.rows_read == 82 and read.format == cfg.data.format
    assert read.dropped == ({"score_ratio": 2} if "shp" in config else {"empty_completion": 2})
    train, test, report = tokenize_splits(train_rows, test_rows, read, tokenizer, cfg.data, RowKind.PREFERENCE)
    assert len(train) == len(test) == 40 and report["drops"]["rows_kept"] == 80
