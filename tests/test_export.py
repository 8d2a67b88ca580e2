"""Outputs that travel: every card preftune writes parses with huggingface_hub and carries the run's
evaluation as model-index; ``preftune export`` gives a folder that plain ``AutoPeftModelForCausalLM``
loads with the run folder, the base model and preftune's cache out of reach; ``merge`` writes a card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from preftune.cli import main
from preftune.pipeline import QUICKSTART

METRICS = {"accuracy", "win_rate", "bits_per_byte"}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A quickstart pipeline on a tiny random model saved in its own folder (so it can be hidden)."""
    from preftune.embedded import tiny_llama

    root = tmp_path_factory.mktemp("export")
    tiny_llama(root / "tiny-base", seed=3)
    old = os.environ.get("PREFTUNE_CACHE")
    os.environ["PREFTUNE_CACHE"] = str(root / "cache")
    try:
        rc = main(["pipeline", str(QUICKSTART), "dpo.enabled=true", "rounds.n=0", f"model={root / 'tiny-base'}", f"output_dir={root / 'run'}",
                   "data.max_rows=16", "data.max_eval_rows=8", "sft.max_steps=2", "dpo.max_steps=2",
                   "eval.winrate.per_category=1", "eval.winrate.max_new_tokens=4", "eval.heldout.max_chunks=2",
                   "eval.tasks_limit=4"])
    finally:
        os.environ.pop("PREFTUNE_CACHE") if old is None else os.environ.__setitem__("PREFTUNE_CACHE", old)
    assert rc == 0
    return root


def _metric_values(card) -> dict[tuple[str, str], float]:
    return {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}


@pytest.mark.e2e
def test_every_card_parses_with_model_index(pipeline_run):
    from huggingface_hub import ModelCard

    run = pipeline_run / "run"
    models = json.loads((run / "eval" / "eval.json").read_text())["models"]
    cards = sorted(run.rglob("README.md"))
    assert {c.parent.relative_to(run).as_posix() for c in cards} >= {"sft/final", "sft/merged", "dpo/final"}
    for path in cards:
        card = ModelCard.load(path)
        stage = path.parent.parent.name
        assert card.data.eval_results, path
        values = _metric_values(card)
        assert {m for m, _ in values} == METRICS
        e = models[stage]
        assert values[("accuracy", "rewards/accuracies")] == pytest.approx(e["rewards"]["rewards/accuracies"])
        assert values[("win_rate", "win-rate vs chosen (rule judge)")] == pytest.approx(e["winrate"]["winrate"])
        assert values[("bits_per_byte", "bits per byte")] == pytest.approx(e["heldout"]["bpb"])
        tasks = {r.dataset_name: r.metric_value for r in card.data.eval_results if r.metric_name == "acc"}
        assert tasks == pytest.approx({"embedded:mc": e["tasks"]["embedded:mc"]["acc"]})
        assert card.data.datasets == ["embedded:prefs"]
        assert "model-index" in path.read_text()
    merged = ModelCard.load(run / "sft" / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    dpo = ModelCard.load(run / "dpo" / "final" / "README.md")
    assert dpo.data.base_model is None  # its base is this run's merged SFT model: no Hub id to name
    assert "Trained with preftune from this run's SFT model (`sft/merged` of the same run)" in dpo.text


@pytest.mark.e2e
def test_merge_command_writes_a_card(pipeline_run, tmp_path):
    from huggingface_hub import ModelCard

    assert main(["merge", str(pipeline_run / "run" / "dpo"), "--out", str(tmp_path / "merged")]) == 0
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert "merged" in card.data.tags and card.data.library_name == "transformers"
    assert {m for m, _ in _metric_values(card)} == METRICS


LOAD = """
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("What is 2 plus 3?", return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


@pytest.mark.e2e
def test_exported_adapter_loads_anywhere_with_plain_peft(pipeline_run, tmp_path):
    """Export the pipeline run (DPO adapter over the merged SFT model), move the run folder, the base
    model and preftune's cache out of the way, and load the export in a fresh process with plain
    AutoPeftModelForCausalLM from another working folder: same logits as the run's own model."""
    from preftune.model import load_for_inference

    root = pipeline_run
    out = tmp_path / "exported"
    assert main(["export", str(root / "run"), "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "base" / "config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "base").resolve())
    model, tok = load_for_inference(str(root / "run"))
    with torch.no_grad():
        expected = model(tok("What is 2 plus 3?", return_tensors="pt").input_ids).logits

    hidden = [root / "run", root / "tiny-base", root / "cache"]
    for p in hidden:
        p.rename(p.with_name(p.name + ".hidden"))
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "logits.pt")], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        for p in hidden:
            p.with_name(p.name + ".hidden").rename(p)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)


@pytest.mark.e2e
def test_export_with_a_hub_base_names_it_in_config_and_card(pipeline_run, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "exported"
    assert main(["export", str(pipeline_run / "run"), "--out", str(out), "--base-repo", "me/qs-sft"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/qs-sft"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "me/qs-sft" and "(`me/qs-sft`)" in card.text
    base_card = ModelCard.load(out / "base" / "README.md")
    assert "merged" in base_card.data.tags  # the base is the SFT adapter merged into its own base
    with pytest.raises(SystemExit):
        shutil.rmtree(out / "nothing", ignore_errors=True)
        main(["export", str(pipeline_run / "run")])  # --out is required
    assert main(["export", str(pipeline_run / "run"), "--out", str(out)]) == 2  # not empty: refused
