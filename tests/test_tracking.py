"""Trackers write what the loop logs into their own local stores under TRL's names, read back with each
library's reader."""

from __future__ import annotations

import sys

import pytest

from preftune.config import Config
from preftune.errors import MissingExtraError
from preftune.tracking import TRACKERS, flatten, local_store, mlflow_key, open_trackers, trl_key

STEPS = [
    {"loss": 0.69, "rewards/accuracies": 0.5, "lr": 1e-4, "eval/rewards/margins": 0.01},
    {"loss": 0.61, "rewards/accuracies": 0.75, "lr": 5e-5, "eval/rewards/margins": 0.2},
    {"loss": 0.52, "rewards/accuracies": 1.0, "lr": 0.0, "eval/rewards/margins": 0.4},
]
TRL_TAGS = {"loss": "train/loss", "rewards/accuracies": "train/rewards/accuracies", "lr": "train/learning_rate",
            "eval/rewards/margins": "eval/rewards/margins"}


def test_trl_key_names():
    assert {k: trl_key(k) for k in TRL_TAGS} == TRL_TAGS
    assert trl_key("tokens_seen") == "train/num_input_tokens_seen"  # transformers' name for it
    assert trl_key("grad_norm") == "train/grad_norm" and trl_key("epoch") == "train/epoch"


def _log_all(names, run_dir, cfg):
    trackers = open_trackers(names, run_dir, cfg)
    for step, metrics in enumerate(STEPS, start=1):
        for t in trackers:
            t.log(metrics, step)
    for t in trackers:
        t.close()


def test_tensorboard_roundtrip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "dpo"
    _log_all(["tensorboard"], run_dir, Config())
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(TRL_TAGS.values())
    for key in STEPS[0]:
        events = acc.Scalars(TRL_TAGS[key])
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([m[key] for m in STEPS])


def test_mlflow_roundtrip(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "sweep" / "beta0.1" / "dpo"
    cfg = Config()
    cfg.dpo.beta = 0.3
    _log_all(["mlflow"], run_dir, cfg)
    client = MlflowClient(tracking_uri=local_store(run_dir))
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.run_name == "beta0.1/dpo"
    assert run.info.status == "FINISHED"
    assert run.data.params["dpo.beta"] == "0.3"
    assert run.data.params["lora.enabled"] == "True"
    assert set(run.data.metrics) == set(TRL_TAGS.values())
    for key in STEPS[0]:
        history = client.get_metric_history(run.info.run_id, TRL_TAGS[key])
        by_step = sorted((m.step, m.value) for m in history)
        assert [s for s, _ in by_step] == [1, 2, 3]
        assert [v for _, v in by_step] == pytest.approx([m[key] for m in STEPS])


def test_mlflow_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "dpo"
    for step in (1, 2):  # two openings, as a killed and resumed stage does
        (t,) = open_trackers(["mlflow"], run_dir, Config())
        t.log({"loss": 1.0 / step}, step)
        t.close()
    client = MlflowClient(tracking_uri=local_store(run_dir))
    (exp,) = [e for e in client.search_experiments() if e.name == "preftune"]
    (run,) = client.search_runs([exp.experiment_id])
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")) == [(1, 1.0), (2, 0.5)]


def test_mlflow_key_sanitizes_only_rejected_characters():
    assert mlflow_key("rewards/accuracies") == "rewards/accuracies"
    assert mlflow_key("eval/logps/chosen") == "eval/logps/chosen"
    assert mlflow_key("acc[0]@top") == "acc_0__top"


def test_flatten_config():
    flat = flatten({"dpo": {"beta": 0.1, "loss": "ipo"}, "report_to": ["mlflow"], "seed": 0})
    assert flat == {"dpo.beta": 0.1, "dpo.loss": "ipo", "report_to": ["mlflow"], "seed": 0}


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_library_names_the_extra(tmp_path, monkeypatch, name, module):
    for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")] or [module]:
        monkeypatch.setitem(sys.modules, loaded, None)  # makes `import module...` raise ImportError
    with pytest.raises(MissingExtraError) as e:
        open_trackers([name], tmp_path, Config())
    assert f"'{module}'" in str(e.value) and "preftune[track]" in str(e.value) and f"report_to: {name}" in str(e.value)


def test_missing_second_tracker_closes_the_first(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    for loaded in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")] or ["mlflow"]:
        monkeypatch.setitem(sys.modules, loaded, None)
    with pytest.raises(MissingExtraError):
        open_trackers(["tensorboard", "mlflow"], tmp_path, Config())
    assert list((tmp_path / "tensorboard").iterdir())  # opened, then closed cleanly


def test_table_names_match_config_validation():
    assert set(TRACKERS) == {"tensorboard", "mlflow", "wandb"}


@pytest.mark.e2e
def test_a_training_run_writes_trl_tags_to_tensorboard(tmp_path, tiny_model_dir, monkeypatch):
    """A real DPO stage with report_to: tensorboard: its event files hold TRL's tag names, with the
    values of metrics.jsonl (which keeps preftune's own)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from preftune.train import run_stage
    from test_train import make_cfg, metrics

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), report_to=["tensorboard"], **{"dpo.eval_every": 2,
                                                                                 "dpo.max_steps": 4})
    run_stage(cfg, "dpo", tmp_path / "run", str(tiny_model_dir))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/learning_rate", "train/grad_norm",
            "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= tags
    assert not {"loss", "lr", "rewards/accuracies"} & tags
    lines = metrics(tmp_path / "run")
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in lines])
    assert [e.step for e in acc.Scalars("eval/rewards/accuracies")] == [2, 4]
