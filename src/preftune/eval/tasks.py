"""Downstream tasks through lm-evaluation-harness (the ``eval`` extra), run on an already-loaded model
and tokenizer: lm-eval task names (online), local task YAMLs, and the embedded ``embedded:mc`` task.
Generation, win-rate and held-out loss live elsewhere in ``preftune.eval``."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import yaml

from preftune.errors import MissingExtraError, PreftuneError

TASKS_DIR = Path(__file__).resolve().parent.parent / "resources" / "tasks"

# config name -> (packaged YAML, lm-eval task name)
EMBEDDED_TASKS: dict[str, tuple[str, str]] = {
    "embedded:mc": ("preftune_mc.yaml", "preftune_mc"),
}

METRICS = ("acc", "acc_norm")

STUDY_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "siqa", "winogrande")
"""The study's downstream tasks (lm-eval names), its "BTLM evaluation harness": the blog names ARC-c
and refers to BTLM-3B-8K's common-sense reasoning and reading suite (Dey et al. 2023), these eight."""

TASK_SETS: dict[str, tuple[str, ...]] = {"study:downstream": STUDY_TASKS}
"""A config name standing for several tasks (``eval.tasks: [study:downstream]``)."""


def mean_accuracy(tasks: dict) -> float | None:
    """Mean ``acc`` over the tasks of one model's ``tasks`` entry (None when no task has one)."""
    accs = [t["acc"] for t in tasks.values() if isinstance(t, dict) and isinstance(t.get("acc"), (int, float))]
    return sum(accs) / len(accs) if accs else None


def _lm_eval():
    try:  # imported here: lm-eval is the optional, heavy `eval` extra
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingExtraError("lm-eval", "eval", "downstream tasks") from None
    return lm_eval, HFLM, TaskManager


class _TaskYAML(yaml.SafeLoader):
    """Reads a task YAML's plain keys; lm-eval's own tags (``!function ...``) are kept as strings."""


_TaskYAML.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node)
                                if isinstance(node, yaml.ScalarNode) else None)


def read_task_yaml(path: Path) -> dict:
    """A task YAML's keys, without importing the functions its tags name."""
    return yaml.load(path.read_text(), Loader=_TaskYAML) or {}


def _local_yaml(spec: str) -> tuple[Path, str]:
    """A local task YAML -> (folder to include, task name)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PreftuneError(f"task YAML not found: {spec} (give an lm-eval task name, a .yaml file, or embedded:mc)")
    task = read_task_yaml(path).get("task")
    if not isinstance(task, str):
        raise PreftuneError(f"task YAML {spec} has no 'task:' name; lm-eval needs one")
    return path.resolve().parent, task


def resolve_tasks(specs: list[str]) -> tuple[list[str], list[str], bool]:
    """Config task names -> (lm-eval task names, folders to include, whether lm-eval's own tasks are needed).

    The shipped tasks are included from their own folder, as the lm-eval CLI's ``--include_path`` does."""
    names, include, defaults = [], [str(TASKS_DIR)], False
    for spec in [t for s in specs for t in TASK_SETS.get(s, (s,))]:
        if spec in EMBEDDED_TASKS:
            names.append(EMBEDDED_TASKS[spec][1])
        elif spec.startswith("embedded:"):
            raise PreftuneError(f"unknown embedded task {spec!r}; known: {', '.join(EMBEDDED_TASKS)}")
        elif spec.endswith((".yaml", ".yml")):
            folder, task = _local_yaml(spec)
            names.append(task)
            include.append(str(folder))
        else:
            names.append(spec)
            defaults = True
    return names, include, defaults


def _metrics(results: dict, task: str) -> dict:
    row = results["results"].get(task, {})
    out = {m: float(row[f"{m},none"]) for m in METRICS if f"{m},none" in row}
    n = results.get("n-samples", {}).get(task, {})
    out["n"] = int(n.get("effective", n.get("original", 0)))
    return out


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
              seed: int = 0) -> dict[str, dict]:
    """Evaluate ``tasks`` zero-shot on ``model``; return ``{config task name: {"acc", "acc_norm", "n"}}``.

    ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides by the
    choice's length in bytes first (lm-eval's definitions). ``limit`` caps examples per task."""
    if not tasks:
        return {}
    lm_eval, HFLM, TaskManager = _lm_eval()
    padding_side = tokenizer.padding_side
    names, include, defaults = resolve_tasks(list(tasks))
    manager = TaskManager(include_path=include, include_defaults=defaults, verbosity="ERROR")
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hint = " (lm-eval's own tasks need their datasets: online, or in the HF cache)" if defaults else ""
        raise PreftuneError(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    quiet = logging.getLogger("lm_eval.api.task")  # its note on custom_dataset kwargs (the shipped task has none)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # lm-eval records the git commit of the working folder by running `git describe`, whose "fatal: not a
    # git repository" lands on the terminal outside a repository; the results do not need it
    evaluator = importlib.import_module("lm_eval.evaluator")
    git_hash = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False,
            bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, verbosity="ERROR",
        )
    except ConnectionError as e:
        raise PreftuneError(
            f"downstream tasks {', '.join(names)}: the dataset could not be fetched ({e}). lm-eval's own "
            "tasks download their data from the Hub: run once online (it is cached), or use a local task "
            "YAML or embedded:mc"
        ) from None
    finally:
        tokenizer.padding_side = padding_side
        quiet.setLevel(level)
        evaluator.get_git_commit_hash = git_hash
    return {spec: _metrics(results, name) for spec, name in zip(tasks, names)}
