"""Experiment trackers for ``report_to``: TensorBoard, MLflow and W&B, each through its own library
(the ``track`` extra), behind one tiny interface: ``log(metrics, step)`` and ``close()``. Trackers
get TRL's key names (``train/loss``, ``train/rewards/accuracies``, ``train/learning_rate``,
``eval/...``), so dashboards and queries built for TRL runs carry over; ``metrics.jsonl`` is written
by train.py under its own names regardless. Nothing here decides what is logged."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from preftune.config import Config, to_dict
from preftune.errors import MissingExtraError, PreftuneError

MLFLOW_EXPERIMENT = "preftune"
WANDB_PROJECT = "preftune"
MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a parameter value's length


TRL_KEYS = {"lr": "train/learning_rate", "tokens_seen": "train/num_input_tokens_seen"}
"""metrics.jsonl names whose TRL (transformers Trainer) name is not just ``train/`` + the name."""


def trl_key(name: str) -> str:
    """A metrics.jsonl name -> the tag TRL's trackers use: ``loss`` -> ``train/loss``, ``lr`` ->
    ``train/learning_rate``, ``eval/...`` as is (transformers' ``rewrite_logs`` convention)."""
    if name.startswith(("eval/", "train/")):
        return name
    return TRL_KEYS.get(name, f"train/{name}")


def trl_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One logged record under TRL's names (``step`` is the x-axis, not a metric)."""
    return {trl_key(k): float(v) for k, v in metrics.items() if k != "step"}


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"dpo": {"beta": 0.1}}`` -> ``{"dpo.beta": 0.1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def run_name(run_dir: Path) -> str:
    """``runs/sweep/beta0.1/dpo`` -> ``beta0.1/dpo``: the run and its stage."""
    run_dir = Path(run_dir).resolve()
    return f"{run_dir.parent.name}/{run_dir.name}"


def _missing(package: str, name: str) -> MissingExtraError:
    return MissingExtraError(package, "track", f"report_to: {name}")


class TensorBoardTracker:
    """Scalars into ``run_dir/tensorboard`` through torch's SummaryWriter; the config as text."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, cfg: Config):
        try:  # each tracker imports its library where it opens: they are the optional `track` extra
            import tensorboard  # noqa: F401  (torch's writer needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", self.name) from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(to_dict(cfg), indent=1) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in trl_metrics(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . / : space``); others -> ``_``.
    TRL's names (``rewards/accuracies``, ``eval/logps/chosen``) pass unchanged."""
    return MLFLOW_BAD_CHARS.sub("_", name)


def local_store(run_dir: Path) -> str:
    """The default MLflow tracking URI of a stage folder: ``sqlite:///RUN_DIR/mlflow.db``."""
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


class MLflowTracker:
    """One MLflow run per stage folder, in a local store -- the SQLite file ``run_dir/mlflow.db`` with
    artifacts under ``run_dir/mlruns`` (MLflow 3 refuses plain ``./mlruns`` file stores) -- unless
    ``MLFLOW_TRACKING_URI`` is set (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``). Params are the flattened config; metrics are logged by step.
    The run id is kept in ``run_dir/mlflow_run_id`` so a resumed stage continues the same run."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", self.name) from None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or local_store(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            exp = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=(run_dir / "mlruns").resolve().as_uri())
            run_id = self.client.create_run(exp_id, run_name=run_name(run_dir)).info.run_id
            params = [Param(mlflow_key(k), str(v)[:MLFLOW_PARAM_MAX]) for k, v in flatten(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
                self.client.log_batch(run_id, params=params[i : i + 100])
            id_file.write_text(run_id)
        self.run_id, self.uri = run_id, uri

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in trl_metrics(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A W&B run in ``run_dir`` (``mode=offline`` unless ``WANDB_MODE`` says otherwise; sync later
    with ``wandb sync``). The run id is kept so a resumed stage continues the same run."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", self.name) from None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_name(run_dir), id=run_id,
            resume="allow", dir=str(run_dir), config=flatten(to_dict(cfg)),
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(trl_metrics(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}
"""``report_to`` name -> tracker class ``(run_dir, cfg)``."""


def open_trackers(names: list[str], run_dir: str | Path, cfg: Config) -> list[Tracker]:
    """One tracker per name in ``names`` (``cfg.report_to``), logging into ``run_dir``.

    A tracker whose library is missing raises MissingExtraError naming the ``track`` extra; the
    ones already opened are closed first."""
    opened: list[Tracker] = []
    try:
        for name in names:
            if name not in TRACKERS:
                raise PreftuneError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
            opened.append(TRACKERS[name](Path(run_dir), cfg))
    except BaseException:
        for t in opened:
            t.close()
        raise
    return opened
