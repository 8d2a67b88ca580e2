"""Model cards: Hub-style YAML front matter, the body's data provenance and figures, refresh after
evaluation, and ``preftune push`` refusing clearly when offline."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

import pytest
import yaml

from preftune import export
from preftune.card import front_matter, model_card, update_card
from preftune.commands.tools import push
from preftune.config import Config, to_yaml
from preftune.errors import PreftuneError

SUMMARY = {
    "stage": "dpo", "method": "ipo", "loss": "ipo", "beta": 0.3, "steps": 40, "total_steps": 50, "tokens_seen": 123456,
    "pairs_seen": 320, "best_step": 30, "best_metric": 0.6875, "stopped_early": True,
    "early_stopping_metric": "eval/rewards/accuracies", "wall_time_s": 61.2, "base_model": "runs/x/sft/merged",
    "reference": "precomputed", "lora": True, "precision": "fp32", "data_fingerprint": "9b2cd5de176ed27d27ac17f9",
}
DATA_REPORT = {
    "read": {"rows_read": 410, "rows_kept": 400, "dropped": {"malformed": 7, "empty_completion": 3}, "format": "hh"},
    "tokenize_train": {"rows_in": 360, "kept": 355, "dropped": {"prompt_too_long": 5},
                       "truncated": {"prompt": 3, "completion": 12}},
    "tokenize_test": {"rows_in": 40, "kept": 40, "dropped": {}, "truncated": 1},  # as older runs wrote it
}
EVAL = {"models": {
    "base": {"heldout": {"bpb": 1.2345}, "winrate": {"winrate": 0.25, "ci_low": 0.1, "ci_high": 0.4},
             "tasks": {"mc": {"acc": 0.5}}},
    "dpo": {"rewards": {"rewards/accuracies": 0.71, "se": 0.05},
            "winrate": {"winrate": 0.625, "ci_low": 0.45, "ci_high": 0.78},
            "heldout": {"bpb": 1.2501, "diff_vs_base": {"mean": 0.0156, "low": 0.01, "high": 0.02}},
            "tasks": {"mc": {"acc": 0.55}, "mc2": {"acc": 0.45}}},
}}


def _cfg(**kw) -> Config:
    cfg = Config(model="embedded:smollm2-135m-instruct", output_dir="runs/beta0.3")
    cfg.dpo.loss, cfg.dpo.beta = "ipo", 0.3
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_front_matter_is_yaml_with_hub_fields():
    text = model_card(_cfg(), SUMMARY, DATA_REPORT)
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft"
    assert meta["tags"] == ["preftune", "dpo", "lora"]
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["embedded:prefs"]
    assert "model-index" not in meta  # no evaluation yet


def test_full_finetune_orpo_on_a_hub_dataset():
    cfg = _cfg()
    cfg.lora.enabled = False
    cfg.data.source = "Anthropic/hh-rlhf"
    meta = front_matter(model_card(cfg, SUMMARY | {"method": "orpo", "lora": False}, DATA_REPORT))
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["preftune", "orpo"]
    assert meta["datasets"] == ["Anthropic/hh-rlhf"]


def test_body_holds_provenance_and_training_figures():
    body = model_card(_cfg(), SUMMARY, DATA_REPORT).split("\n---\n", 1)[1]
    assert "9b2cd5de176ed27d27ac17f9" in body
    assert "dropped: empty_completion: 3, malformed: 7" in body
    assert "dropped: prompt_too_long: 5" in body and "3 prompts and 12 completions truncated" in body
    assert "40 kept, 1 truncated" in body
    assert "`ipo`, **beta** 0.3" in body
    assert "r=16, alpha=32" in body
    assert "123456" in body and "Best step:** 30" in body
    assert "## Evaluation" not in body


def test_eval_figures_when_given():
    body = model_card(_cfg(), SUMMARY, DATA_REPORT, EVAL)
    assert "## Evaluation" in body
    dpo_row = next(line for line in body.splitlines() if line.startswith("| dpo |"))
    assert "0.710 ± 0.050" in dpo_row and "0.625 [0.45, 0.78]" in dpo_row and "1.2501" in dpo_row
    assert "+0.0156" in dpo_row and "0.500" in dpo_row  # mean of the two task accuracies
    assert next(line for line in body.splitlines() if line.startswith("| base |"))


def _stage(tmp_path):
    stage = tmp_path / "run" / "dpo"
    for sub in ("final", "best"):
        (stage / sub).mkdir(parents=True)
        (stage / sub / "adapter_config.json").write_text("{}")
    (stage / "config.yaml").write_text(to_yaml(_cfg()))
    (stage / "run.json").write_text(json.dumps(SUMMARY))
    (stage / "data.json").write_text(json.dumps({"fingerprint": "9b2cd5de176ed27d27ac17f9", **DATA_REPORT}))
    return stage


def test_update_card_refreshes_best_and_final(tmp_path):
    stage = _stage(tmp_path)
    written = update_card(tmp_path / "run", EVAL)
    assert sorted(p.parent.name for p in written) == ["best", "final"]
    for sub in ("best", "final"):
        text = (stage / sub / "README.md").read_text()
        assert front_matter(text)["tags"] == ["preftune", "dpo", "lora"]
        assert "0.625 [0.45, 0.78]" in text


def test_push_offline_is_a_clear_error_before_any_network(tmp_path, monkeypatch):
    _stage(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any Hub import would fail differently,
    monkeypatch.setattr(export, "HfApi", None)  # and so would any use of the Hub client
    with pytest.raises(PreftuneError, match="HF_HUB_OFFLINE=1") as e:
        push(Namespace(run=str(tmp_path / "run"), repo="me/model"))
    assert "best" in str(e.value) and "me/model" in str(e.value)


def test_push_names_a_missing_run(tmp_path):
    with pytest.raises(PreftuneError, match="not found"):
        push(Namespace(run=str(tmp_path / "nope"), repo="me/model"))


def test_card_parses_with_huggingface_hub_and_holds_the_figures():
    from huggingface_hub import ModelCard

    card = ModelCard(model_card(_cfg(), SUMMARY, DATA_REPORT, EVAL))
    got = {(r.metric_type, r.metric_name, r.dataset_name): r.metric_value for r in card.data.eval_results}
    assert got == {("accuracy", "rewards/accuracies", "embedded:prefs"): 0.71,
                   ("win_rate", "win-rate vs chosen (rule judge)", "embedded:prefs"): 0.625,
                   ("bits_per_byte", "bits per byte", "embedded:lee"): 1.2501,
                   ("accuracy", "acc", "mc"): 0.55, ("accuracy", "acc", "mc2"): 0.45}
    assert card.data.model_name == "beta0.3-dpo" and card.data.datasets == ["embedded:prefs"]


def test_a_stage_trained_from_this_runs_sft_model_names_it_truly(tmp_path):
    """DPO over the run's merged SFT model: no Hub id exists for that base, so base_model is left out
    and the text names it; given where the base was pushed, base_model is that id."""
    (tmp_path / "run" / "sft" / "merged").mkdir(parents=True)
    (tmp_path / "run" / "sft" / "run.json").write_text(json.dumps({"stage": "sft"}))
    summary = SUMMARY | {"base_model": str(tmp_path / "run" / "sft" / "merged")}
    text = model_card(_cfg(), summary, DATA_REPORT)
    assert "base_model" not in front_matter(text)
    assert "from this run's SFT model (`sft/merged` of the same run), itself trained from " \
           "`HuggingFaceTB/SmolLM2-135M-Instruct`" in text
    pushed = model_card(_cfg(), summary, DATA_REPORT, base_repo="me/sft")
    assert front_matter(pushed)["base_model"] == "me/sft" and "(`me/sft`)" in pushed
    merged = front_matter(model_card(_cfg(), summary, DATA_REPORT, merged=True))
    assert merged["library_name"] == "transformers" and merged["tags"] == ["preftune", "dpo", "merged"]
