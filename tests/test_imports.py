"""Imports go one way: scripts import the engine and the modules they share (SHARED), never each other; the engine
(the top-level modules) imports no script; and no engine module imports itself back (no cycle)."""
import ast
from pathlib import Path

from conftest import REPO

ENGINE = {p.stem for p in REPO.glob("*.py")}
SCRIPTS = {p.stem for p in (REPO / "scripts").glob("*.py")}
SHARED = {"samples", "output", "evaluation", "timing", "harness", "hf_peer", "servers"}  # what the scripts share, by concept


def imported(path: Path) -> set[str]:
    """Every module name the file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_engine_imports_no_script():
    for name in ENGINE:
        assert not imported(REPO / f"{name}.py") & (SCRIPTS - ENGINE), name


def test_scripts_import_only_the_engine_and_the_shared_modules():
    assert SHARED <= SCRIPTS
    for name in SCRIPTS:
        assert imported(REPO / "scripts" / f"{name}.py") & SCRIPTS <= SHARED - {name}, name


def test_no_import_cycle_in_the_engine():
    graph = {name: imported(REPO / f"{name}.py") & ENGINE for name in ENGINE}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"
    for name in sorted(graph):
        visit(name, [])


def test_the_engine_never_edits_sys_path():
    for path in REPO.glob("*.py"):
        assert "sys.path" not in path.read_text(), path
