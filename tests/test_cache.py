"""The tokenized-rows cache: a warm call returns exactly the cold call's rows and report from disk,
and a changed tokenizer, template, limit or mapping misses."""

from __future__ import annotations

import copy
import logging

import pytest

from preftune.config import DataConfig
from preftune.data.cache import cache_key, rows_digest, tokenize_rows_cached
from preftune.data.rows import PreferenceRow, SFTRow
from preftune.data.tokenize import RowKind, tokenize

ROWS = [PreferenceRow([{"role": "user", "content": f"Question {i}? " * (i % 5 + 1)}], f"Answer {i}. " * (i % 7 + 1),
                      "I do not know.", {"i": i}) for i in range(40)] + [PreferenceRow("Q", "same", "same")]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))


def hit(caplog) -> bool:
    return "reused from" in caplog.text


def test_warm_call_loads_what_the_cold_call_computed(tmp_path, tokenizer, caplog):
    data = DataConfig(max_length=48, max_prompt_length=24)
    with caplog.at_level(logging.INFO, logger="preftune"):
        cold, cold_report = tokenize_rows_cached(ROWS, tokenizer, data)
        assert not hit(caplog) and len(list((tmp_path / "tokenized").glob("*.npz"))) == 1
        warm, warm_report = tokenize_rows_cached(ROWS, tokenizer, data)
    assert hit(caplog)
    assert warm == cold and [t.meta for t in warm] == [r.meta for r in ROWS[:40]]
    assert warm_report.to_dict() == cold_report.to_dict()
    assert warm_report.raw_lengths == cold_report.raw_lengths and warm_report.lengths == cold_report.lengths
    assert cold_report.dropped == {"chosen_equals_rejected": 1} and cold_report.truncated["completion"] > 0
    plain = tokenize(ROWS, tokenizer, data, RowKind.PREFERENCE).items
    assert plain == cold


def test_sft_rows_cache_too(tokenizer, caplog):
    rows = [SFTRow(f"Say {i}", f"{i}!") for i in range(5)]
    data = DataConfig(max_length=32, max_prompt_length=16)
    cold, _ = tokenize_rows_cached(rows, tokenizer, data, RowKind.SFT)
    with caplog.at_level(logging.INFO, logger="preftune"):
        warm, _ = tokenize_rows_cached(rows, tokenizer, data, RowKind.SFT)
    assert hit(caplog) and warm == cold


def key(tokenizer, data: DataConfig, rows=ROWS) -> str:
    return cache_key(rows_digest(rows, RowKind.PREFERENCE), tokenizer, data, RowKind.PREFERENCE)


def test_a_changed_tokenizer_template_limit_mapping_or_row_misses(tokenizer):
    data = DataConfig(max_length=48, max_prompt_length=24)
    base = key(tokenizer, data)
    assert key(tokenizer, DataConfig(max_length=48, max_prompt_length=24)) == base  # same content, same key
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<new_token>"])
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = templated.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed_row = ROWS[:3] + [PreferenceRow(ROWS[3].prompt, ROWS[3].chosen + "!", ROWS[3].rejected)] + ROWS[4:]
    others = [
        key(grown, data), key(templated, data),
        key(tokenizer, DataConfig(max_length=64, max_prompt_length=24)),
        key(tokenizer, DataConfig(max_length=48, max_prompt_length=16)),
        key(tokenizer, DataConfig(max_length=48, max_prompt_length=24, columns={"prompt": "question"})),
        key(tokenizer, data, changed_row),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_a_changed_limit_misses_end_to_end(tokenizer, caplog):
    tokenize_rows_cached(ROWS, tokenizer, DataConfig(max_length=48, max_prompt_length=24))
    with caplog.at_level(logging.INFO, logger="preftune"):
        items, _ = tokenize_rows_cached(ROWS, tokenizer, DataConfig(max_length=40, max_prompt_length=24))
    assert not hit(caplog) and max(len(t.prompt_ids) + len(t.chosen_ids) for t in items) <= 40


def test_an_unreadable_entry_is_recomputed(tmp_path, tokenizer, caplog):
    data = DataConfig(max_length=48, max_prompt_length=24)
    cold, _ = tokenize_rows_cached(ROWS, tokenizer, data)
    (entry,) = (tmp_path / "tokenized").glob("*.npz")
    entry.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="preftune"):
        again, _ = tokenize_rows_cached(ROWS, tokenizer, data)
    assert "unreadable" in caplog.text and again == cold
