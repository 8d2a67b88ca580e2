"""``data.columns`` and ``data.roles``: renaming before detection and adaptation, and the errors a
bad mapping gives (config-time did-you-mean; a missing column lists the data's columns)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import ConfigError, DataConfig
from preftune.config.validate import load_config
from preftune.data.mapping import apply_columns, apply_roles
from preftune.data.sources import load_rows
from preftune.errors import DataError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SE = [{"question": f"Q{i}?", "response_j": f"good {i}", "response_k": f"bad {i}", "qid": i} for i in range(4)]
"""Stack-Exchange-paired style columns."""


def test_columns_map_a_differently_named_dataset(tmp_path):
    f = write_jsonl(tmp_path / "se.jsonl", SE)
    data = DataConfig(source=str(f), test_size=0.0,
                      columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    train, _, rep = load_rows(data, "preference", seed=0)
    assert rep.format == "standard" and len(train) == 4
    assert (train[1].prompt, train[1].chosen, train[1].rejected, train[1].meta) == ("Q1?", "good 1", "bad 1", {"qid": 1})


def test_a_mapping_naming_a_missing_column_lists_the_columns(tmp_path):
    f = write_jsonl(tmp_path / "se.jsonl", SE)
    data = DataConfig(source=str(f), columns={"prompt": "questoin", "chosen": "response_j", "rejected": "response_k"})
    with pytest.raises(DataError) as e:
        load_rows(data, "preference", seed=0)
    text = str(e.value)
    assert str(f) in text and "prompt: questoin" in text and "did you mean 'question'" in text
    assert "['qid', 'question', 'response_j', 'response_k']" in text


def test_unknown_field_or_role_key_is_a_config_error_with_did_you_mean(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.columns={promt: question}", "data.roles={role_kye: from}"])
    text = str(e.value)
    assert "data.columns: unknown field 'promt' (did you mean 'prompt'?)" in text
    assert "data.roles: unknown key 'role_kye' (did you mean 'role_key'?)" in text
    with pytest.raises(ConfigError, match="both map to column 'a'"):
        load_config(None, ["data.columns={chosen: a, rejected: a}"])


def test_roles_rename_keys_and_role_names_of_any_conversation(tmp_path):
    """A messages SFT file with ``speaker``/``text`` keys and bot/person roles."""
    roles = {"role_key": "speaker", "content_key": "text", "user": "person", "assistant": "bot"}
    conv = [{"speaker": "person", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"dialog": conv}])
    data = DataConfig(source=str(f), test_size=0.0, columns={"messages": "dialog"}, roles=roles)
    train, _, rep = load_rows(data, "sft", seed=0)
    assert rep.format == "messages"
    assert train[0].prompt == [{"role": "user", "content": "Hi"}] and train[0].completion == "Hello"


def test_apply_columns_and_roles_directly():
    rec = {"q": "x", "prompt": "shadowed", "keep": 1}
    assert apply_columns(rec, {"prompt": "q"}) == {"prompt": "x", "keep": 1}
    rec = {"chosen": {"from": "gpt", "value": "a"}, "input": {"messages": [{"from": "human", "value": "q"}]}, "n": 3}
    out = apply_roles(rec, {"role_key": "from", "content_key": "value", "user": "human", "assistant": "gpt"})
    assert out == {"chosen": {"role": "assistant", "content": "a"},
                   "input": {"messages": [{"role": "user", "content": "q"}]}, "n": 3}


def test_system_column_becomes_the_first_message(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"instruction_text": "Hi", "good": "Hello", "bad": "Go", "sys": "Be kind."}])
    data = DataConfig(source=str(f), test_size=0.0,
                      columns={"prompt": "instruction_text", "chosen": "good", "rejected": "bad", "system": "sys"})
    (row,), _, _ = load_rows(data, "preference", seed=0)
    assert row.prompt == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert "system" not in row.meta
