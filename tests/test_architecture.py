"""The house plan holds: every module ARCHITECTURE.md names exists, the package has no import cycle
(imports inside functions included), no library module imports the commands layer, and importing
the report neither loads matplotlib nor switches its backend."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "preftune"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = ("preftune", *p.relative_to(PKG).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Internal modules ``path`` imports, anywhere in the file (``from pkg import module`` counted)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("preftune"):
            found |= {m for m in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if m in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


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


def test_no_import_cycles_and_commands_on_top():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m, "preftune"} for m, p in modules.items()}
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
