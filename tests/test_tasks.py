"""Downstream tasks through lm-evaluation-harness: the embedded multiple-choice task offline on the
tiny model, a local task YAML, the shipped data, and the error without the ``eval`` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from preftune.embedded import tiny_llama
from preftune.errors import MissingExtraError, PreftuneError
from preftune.eval.tasks import TASKS_DIR, read_task_yaml, run_tasks

pytest.importorskip("lm_eval")
LM_EVAL = Path(sys.executable).with_name("lm_eval")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def test_embedded_questions_are_well_formed():
    rows = [json.loads(line) for line in (TASKS_DIR / "preftune_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 60
    for r in rows:
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and r["answer"] in range(4)
    # answers are spread over the positions, so a position bias cannot score well
    assert sorted({sum(r["answer"] == k for r in rows) for k in range(4)}) == [15]
    assert read_task_yaml(TASKS_DIR / "preftune_mc.yaml")["task"] == "preftune_mc"


def test_embedded_task_runs_offline(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # the data path must not depend on the working directory
    model, tok = tiny
    out = run_tasks(model, tok, ["embedded:mc"], limit=8, batch_size=8)
    # outside a git repository lm-eval's `git describe` printed "fatal: not a git repository"
    assert "fatal:" not in capfd.readouterr().err
    r = out["embedded:mc"]
    assert r["n"] == 8 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert r["acc"] * 8 == int(r["acc"] * 8)  # a fraction of the 8 questions
    assert tok.padding_side == "right"  # the tokenizer is handed back as it was


def test_local_task_yaml(tiny, tmp_path):
    """A user's own task YAML: two questions whose right answer is a copy of the question's last word
    (so the check is only on plumbing: n and the metric range)."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in [
        ("Say blue: blue", ["red", "blue"], 1), ("Say cat: cat", ["cat", "dog"], 0)]))
    spec = read_task_yaml(TASKS_DIR / "preftune_mc.yaml")
    del spec["custom_dataset"]
    spec |= {"task": "my_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (tmp_path / "my_task.yaml").write_text(yaml.safe_dump(spec))
    model, tok = tiny
    out = run_tasks(model, tok, [str(tmp_path / "my_task.yaml")], batch_size=4)
    (r,) = out.values()
    assert r["n"] == 2 and r["acc"] in (0.0, 0.5, 1.0)
    with pytest.raises(PreftuneError, match="task YAML not found"):
        run_tasks(model, tok, [str(tmp_path / "missing.yaml")])
    with pytest.raises(PreftuneError, match="unknown embedded task"):
        run_tasks(model, tok, ["embedded:nope"])


def test_without_lm_eval_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    model, tok = tiny
    with pytest.raises(MissingExtraError, match=r"preftune\[eval\]") as e:
        run_tasks(model, tok, ["embedded:mc"])
    assert "lm-eval" in str(e.value) and "downstream tasks" in str(e.value)


@pytest.mark.e2e
def test_shipped_task_runs_from_the_lm_eval_cli_in_another_folder(tiny_model_dir, tmp_path):
    """docs/evaluation.md's command: plain ``lm_eval`` with ``--include_path`` at the shipped folder, run from
    an unrelated working folder, scores the 60 questions (limited here to 6) on a saved model."""
    if not LM_EVAL.is_file():
        pytest.skip("the lm_eval command is not installed beside this Python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "results"
    r = subprocess.run(
        [str(LM_EVAL), "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu",
         "--include_path", str(TASKS_DIR), "--tasks", "preftune_mc", "--limit", "6", "--batch_size", "6",
         "--output_path", str(out)],
        cwd=elsewhere, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    row = json.loads(results.read_text())["results"]["preftune_mc"]
    assert 0 <= row["acc,none"] <= 1 and row["acc,none"] * 6 == round(row["acc,none"] * 6)


def test_the_study_task_set_expands_in_place():
    from preftune.eval.tasks import STUDY_TASKS, resolve_tasks

    names, _, needs_lm_eval_tasks = resolve_tasks(["embedded:mc", "study:downstream"])
    assert names == ["preftune_mc", *STUDY_TASKS] and needs_lm_eval_tasks
    assert "arc_challenge" in STUDY_TASKS and len(STUDY_TASKS) == 8
