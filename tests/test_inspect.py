"""``preftune data inspect``: through the CLI table and the console script, on small files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import main


def write_pairs(path: Path, n: int = 12, extra_lines: tuple[str, ...] = ()) -> Path:
    rows = [json.dumps({"prompt": f"What is {i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea.",
                        "category": "math"}) for i in range(n)]
    rows.append(json.dumps({"prompt": "Echo", "chosen": "same", "rejected": "same"}))
    path.write_text("\n".join(rows + list(extra_lines)) + "\n")
    return path


def run_json(capsys, *args: str) -> dict:
    assert main(["data", "inspect", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object on stdout


def test_text_report_shows_counts_lengths_and_masked_sample(tmp_path, capsys):
    f = write_pairs(tmp_path / "d.jsonl")
    assert main(["data", "inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "rows read: 13  kept: 12" in out
    assert "dropped: chosen_equals_rejected=1" in out
    assert "p50" in out and "p99" in out and "rejected" in out
    assert "truncated: 0 of 12 prompts (0.0%) cut to max_prompt_length=256; 0 rows (0.0%)" in out
    assert "untruncated" in out  # the length percentiles before truncation
    assert "7.7% of rows read (data.max_drop_fraction 0.05; training would STOP)" in out
    # The sample shows the masked prompt, the boundary and the completion with its EOS.
    assert "[MASKED <|im_start|>system" in out and "<|im_start|>assistant\n]|It is" in out
    assert "<|im_end|>" in out.split("]|", 1)[1]


def test_json_report_keys_and_accounting(tmp_path, capsys):
    f = write_pairs(tmp_path / "d.jsonl", n=20)
    s = run_json(capsys, str(f))
    assert s["rows_read"] == 21 and s["rows_kept"] == 20
    assert s["dropped"] == {"chosen_equals_rejected": 1}
    assert s["rows_read"] == s["rows_kept"] + sum(s["dropped"].values())
    assert sum(s["splits"].values()) == 20 and s["splits"]["heldout"] >= 1  # test_size 0.1 carved off
    assert set(s["lengths"]) == {"prompt", "chosen", "rejected"}
    assert set(s["lengths"]["chosen"]) == {"p50", "p90", "p99", "max"}
    assert s["format"] == "standard" and s["truncation_rate"] == {"prompt": 0.0, "completion": 0.0}
    assert s["truncated"] == {"prompt": 0, "completion": 0}
    assert s["lengths_before_truncation"] == s["lengths"]  # nothing was cut
    assert s["bad_fraction"] == pytest.approx(1 / 21) and not s["over_max_drop_fraction"]


def test_overrides_drive_truncation(tmp_path, capsys):
    f = write_pairs(tmp_path / "d.jsonl")
    s = run_json(capsys, str(f), "data.max_length=10", "data.max_prompt_length=8")
    assert s["lengths"]["prompt"]["max"] == 8
    assert s["truncated"] == {"prompt": s["rows_kept"], "completion": s["rows_kept"]}
    assert s["truncation_rate"] == {"prompt": 1.0, "completion": 1.0}
    assert s["lengths"]["chosen"]["max"] == 2
    assert s["lengths_before_truncation"]["prompt"]["max"] > 8 and s["lengths_before_truncation"]["chosen"]["max"] > 2


def test_format_flag_and_sft(tmp_path, capsys):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    bad = [conv[0], {"role": "assistant", "content": "Go away"}]
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"chosen": conv, "rejected": bad}) + "\n")
    assert run_json(capsys, str(f), "--format", "implicit")["format"] == "implicit"
    assert run_json(capsys, str(f))["format"] == "chat"
    a = tmp_path / "alpaca.jsonl"
    a.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    s = run_json(capsys, str(a), "--sft")
    assert s["kind"] == "sft" and s["format"] == "alpaca" and set(s["lengths"]) == {"prompt", "completion"}
    assert s["sample"]["prompt"].startswith("<|im_start|>system") and "### Instruction:\nSay hi" in s["sample"]["prompt"]


def test_config_target_uses_the_model_folder_tokenizer(tmp_path, capsys, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    cfg_path = tmp_path / "tok.json"
    cfg_path.write_text((model / "tokenizer_config.json").read_text())
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    data = write_pairs(tmp_path / "d.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model}\ndata:\n  source: {data}\n  max_length: 64\n  max_prompt_length: 32\n")
    s = run_json(capsys, str(config))
    # Without a chat template the prompt is the plain text, not ChatML.
    assert s["sample"]["prompt"].startswith("What is") and s["max_length"] == 64


def test_malformed_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    f = write_pairs(tmp_path / "d.jsonl", n=2, extra_lines=('{"prompt": "x", "chosen": 1, "rejected": "y"}',))
    assert main(["data", "inspect", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"preftune: error: {f}, row 4, field 'chosen': 'chosen' must be a string or a list of messages, got int"
    assert main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def console_script() -> str:
    script = Path(sys.executable).parent / "preftune"
    if not script.is_file():
        pytest.skip("the preftune console script is not installed next to this Python")
    return str(script)


def test_console_script_exit_codes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    good = write_pairs(tmp_path / "good.jsonl", n=3)
    r = subprocess.run([console_script(), "data", "inspect", str(good), "--json"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_kept"] == 3
    bad = write_pairs(tmp_path / "bad.jsonl", n=2, extra_lines=("{not json",))
    r = subprocess.run([console_script(), "data", "inspect", str(bad)], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and f"{bad}, row 4: not valid JSON" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


LAYOUTS = {
    "openai": ([{"input": {"messages": [{"role": "system", "content": "Brief."}, {"role": "user", "content": f"Q{i}"}]},
                 "preferred_output": [{"role": "assistant", "content": f"A{i}"}],
                 "non_preferred_output": [{"role": "assistant", "content": "No."}]} for i in range(6)], (), "preference"),
    "sharegpt": ([{"conversations": turns(("human", f"Q{i}")), "chosen": {"from": "gpt", "value": f"A{i}"},
                   "rejected": {"from": "gpt", "value": "No."}} for i in range(6)], (), "preference"),
    "sharegpt-sft": ([{"conversations": turns(("human", f"Q{i}"), ("gpt", f"A{i}"))} for i in range(6)], ("--sft",),
                     "sft"),
    "kto": ([{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 3 != 0} for i in range(6)], (), "unpaired"),
    "shp": ([{"history": f"Q{i}", "human_ref_A": f"A{i}", "human_ref_B": "No.", "labels": 1} for i in range(6)], (),
            "preference"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_new_layout_inspects_with_every_count(tmp_path, capsys, monkeypatch, layout):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    records, flags, kind = LAYOUTS[layout]
    f = write_jsonl(tmp_path / f"{layout}.jsonl", records)
    s = run_json(capsys, str(f), *flags)
    assert s["kind"] == kind and s["format"] == layout.split("-")[0]
    assert s["rows_read"] == 6 == s["rows_kept"] + sum(s["dropped"].values())
    assert set(s["truncated"]) == {"prompt", "completion"} and s["lengths_before_truncation"]
    assert (s["labels"] == {"desirable": 4, "undesirable": 2}) if kind == "unpaired" else s["labels"] is None
    assert bool(s["notes"]) == (layout == "shp")
    assert main(["data", "inspect", str(f), *flags]) == 0
    assert "truncated:" in capsys.readouterr().out


def test_mapping_through_overrides_and_a_bad_mapping_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    f = write_jsonl(tmp_path / "se.jsonl", [{"question": f"Q{i}", "response_j": f"A{i}", "response_k": "No."}
                                            for i in range(4)])
    s = run_json(capsys, str(f), "data.columns={prompt: question, chosen: response_j, rejected: response_k}")
    assert s["rows_kept"] == 4 and s["format"] == "standard"
    assert main(["data", "inspect", str(f), "data.columns={prompt: q, chosen: response_j, rejected: response_k}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "['question', 'response_j', 'response_k']" in err
