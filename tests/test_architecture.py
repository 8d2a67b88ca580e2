"""The house plan holds: every module ARCHITECTURE.md names exists, every import (inside functions too)
goes down the layer table of ARCHITECTURE.md, the package has no import cycle, no module but paths.py
joins run-folder names, and importing the report neither loads matplotlib nor switches its backend."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "preftune"


def _modules() -> dict[str, Path]:
    """Every module of the package but the task files under ``resources/`` (data that lm-eval loads)."""
    out = {}
    for p in PKG.rglob("*.py"):
        if p.relative_to(PKG).parts[0] == "resources":
            continue
        parts = ("preftune", *p.relative_to(PKG).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(source: str, modules: dict[str, Path] | set[str]) -> set[str]:
    """Internal modules a module's ``source`` imports, anywhere in the file (``from pkg import module``
    counted; what ``if TYPE_CHECKING:`` imports is never run, so it is left out)."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("preftune"):
            found |= {m for m in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if m in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


# ----- the layer table -----

def _layer_table() -> list[tuple[str, list[str]]]:
    """ARCHITECTURE.md's layers, top (foundations) first: ``[(layer, [module paths])]``."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Layers"):].split("\n\n")[1]
    rows = [r.split("|") for r in table.splitlines() if r.startswith("|")][2:]
    return [(r[1].strip(), re.findall(r"`([a-z_/]+\.py)`", r[2])) for r in rows]


def _dotted(path: str) -> str:
    return "preftune." + path.removesuffix(".py").replace("/", ".")


def layer_of() -> dict[str, int]:
    """Module -> its layer's index in ARCHITECTURE.md (0: foundations). A package's ``__init__`` sits in
    the lowest layer of its modules, so importing the package is never an upward import."""
    layers = {_dotted(m): i for i, (_, mods) in enumerate(_layer_table()) for m in mods}
    for name in _modules():
        if name not in layers and name != "preftune":
            layers[name] = min(i for m, i in layers.items() if m.startswith(name + "."))
    layers["preftune"] = 0
    return layers


def upward_imports(module: str, source: str, layers: dict[str, int]) -> list[str]:
    """``"a -> b (data imports training)"`` for every import in ``source`` (of ``module``) of a module
    in a lower layer of the table than ``module``'s own."""
    names = [name for name, _ in _layer_table()]
    return [f"{module} -> {d} ({names[layers[module]]} imports {names[layers[d]]})"
            for d in sorted(_imports(source, layers)) if layers[d] > layers[module]]


# ----- the run-folder layout -----

def run_folder_names() -> set[str]:
    """The names paths.py joins into run folders (``"final"``, ``"run.json"``, ``"rounds"`` ...), its
    stage folders, and the constant heads of the names it builds (``"step-"``, ``"round-"``)."""
    tree = ast.parse((PKG / "paths.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    names.add(side.value)
                elif isinstance(side, ast.JoinedStr) and isinstance(side.values[0], ast.Constant):
                    names.add(side.values[0].value)
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["STAGES"]:
            names |= set(ast.literal_eval(node.value))
    return names


def _joined_names(part: ast.expr, names: set[str]) -> set[str]:
    """Run-folder names in one operand of a path join (a literal, ``"eval/eval.json"``, ``f"step-{n}"``)."""
    if isinstance(part, ast.Constant) and isinstance(part.value, str):
        return set(Path(part.value).parts) & names
    if isinstance(part, ast.JoinedStr) and part.values and isinstance(part.values[0], ast.Constant):
        head = part.values[0].value
        return {n for n in names if n.endswith("-") and head.startswith(n)} | ({head} & names)
    return set()


def run_folder_joins(source: str, names: set[str]) -> list[tuple[int, str]]:
    """``(line, name)`` for every run-folder name that ``source`` joins into a path itself: ``x / "final"``,
    ``Path(x, "run.json")``, ``os.path.join(x, "best")``, ``x.joinpath("rounds")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.left, node.right]
        elif isinstance(node, ast.Call) and (
                ast.unparse(node.func) in ("Path", "PurePath", "os.path.join", "pathlib.Path")
                and len(node.args) > 1 or isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath"):
            parts = node.args
        else:
            continue
        found += [(node.lineno, n) for part in parts for n in sorted(_joined_names(part, names))]
    return found


NOT_RUN_FOLDERS = {
    ("eval/suite.py", "eval"): "the evaluation cache under the cache root, not a run folder",
}
"""(module, name) -> why that join of a run-folder name is not a run folder's."""

def test_every_module_architecture_md_names_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", text))
    assert len(named) > 30
    missing = sorted(n for n in named if not (PKG / n).is_file() and not (ROOT / n).is_file())
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
    unnamed = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                     if p.name != "__init__.py" and p.relative_to(PKG).parts[0] != "resources"  # data, not code
                     and str(p.relative_to(PKG)) not in named)
    assert not unnamed, f"ARCHITECTURE.md does not say where these modules belong: {unnamed}"


def test_every_import_goes_down_the_layers():
    layers, modules = layer_of(), _modules()
    assert set(modules) <= set(layers), sorted(set(modules) - set(layers))
    upward = [u for m, p in sorted(modules.items()) for u in upward_imports(m, p.read_text(), layers)]
    assert not upward, "imports that go up ARCHITECTURE.md's layer table:\n" + "\n".join(upward)


@pytest.mark.parametrize("module, source, expected", [
    ("preftune.data.rows", "def f():\n    from preftune.train import run_stage\n",
     ["preftune.data.rows -> preftune.train (data imports training)"]),
    ("preftune.paths", "import preftune.config\n", []),
    ("preftune.losses", "from preftune.eval import judges\n",
     ["preftune.losses -> preftune.eval (model side imports training)",
      "preftune.losses -> preftune.eval.judges (model side imports evaluation)"]),
    ("preftune.report.table", "from preftune import pipeline\n",
     ["preftune.report.table -> preftune.pipeline (outputs imports orchestration)"]),
    ("preftune.train", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from preftune.serve import app\n", []),
])
def test_the_layer_check_catches_a_planted_upward_import(module, source, expected):
    assert upward_imports(module, source, layer_of()) == expected


def test_the_layer_table_is_read_whole():
    table = _layer_table()
    assert [name for name, _ in table] == ["foundations", "data", "model side", "training", "evaluation",
                                           "outputs", "orchestration", "interface"]
    assert "paths.py" in table[0][1] and "cli.py" in table[-1][1]


def test_only_paths_py_joins_run_folder_names():
    names = run_folder_names()
    assert {"final", "best", "run.json", "metrics.jsonl", "eval.json", "rounds", "round.json", "step-",
            "round-", "sft", "dpo"} <= names
    found = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG))
        if rel != "paths.py":
            found += [f"{rel}:{line} joins {name!r}" for line, name in run_folder_joins(p.read_text(), names)
                      if (rel, name) not in NOT_RUN_FOLDERS]
    assert not found, "run-folder paths built outside paths.py (add a property there and use it):\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ('from pathlib import Path\ndef f(out):\n    return out / "final" / "config.json"\n', [(3, "final")]),
    ('def f(out):\n    return Path(out, "run.json")\n', [(2, "run.json")]),
    ('import os\ndef f(out):\n    return os.path.join(out, "eval/eval.json")\n', [(3, "eval"), (3, "eval.json")]),
    ('def f(out, k):\n    return out.joinpath("rounds") / f"round-{k}"\n', [(2, "round-"), (2, "rounds")]),
    ('def f(out):\n    return out / "model.safetensors"\n', []),
    ('def f(run):\n    return run.final / "config.json"\n', []),
])
def test_the_layout_check_catches_a_planted_run_folder_join(source, expected):
    assert sorted(run_folder_joins(source, run_folder_names())) == sorted(expected)


def test_no_import_cycles_and_commands_on_top():
    modules = _modules()
    graph = {m: _imports(p.read_text(), modules) - {m, "preftune"} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    library = [m for m in graph if not m.startswith("preftune.commands") and m != "preftune.cli"]
    assert not [m for m in library if any(d.startswith("preftune.commands") for d in graph[m])]


def test_importing_the_report_leaves_matplotlib_alone():
    code = ("import sys, preftune.report, preftune.card\n"
            "assert 'matplotlib' not in sys.modules, 'preftune.report loaded matplotlib'\n"
            "import matplotlib\n"
            "before = matplotlib.get_backend()\n"
            "import preftune.report.report\n"
            "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
            "print(before)\n")
    env = dict(os.environ, MPLBACKEND="svg", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "svg"


def test_the_loop_asks_the_method_not_the_config_type():
    """train.py and data/stage.py check no config class with isinstance and read no method setting by
    name with getattr: what differs between methods is on ``Method`` (methods.py)."""
    config_classes = {n.name for part in ("schema.py", "training.py", "evaluation.py")
                      for n in ast.parse((PKG / "config" / part).read_text()).body if isinstance(n, ast.ClassDef)}
    assert {"DPOConfig", "SFTConfig", "TrainConfig"} <= config_classes
    found = []
    for rel in ("train.py", "data/stage.py"):
        for node in ast.walk(ast.parse((PKG / rel).read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("isinstance", "getattr") and len(node.args) > 1:
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & config_classes
                if named or ast.unparse(node.args[1]) in ("'sync_ref_model'", "'completion_only'"):
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
