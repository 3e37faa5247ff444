"""A warning raised in a test run is seen: the TestClient runs without a deprecation, and no
module of the code silences warnings for the process that imports it.

Session 33's `make test` was recorded as "0 warnings" while every TestClient run warned
(starlette 1.10: "Using `httpx` with `starlette.testclient` is deprecated; install `httpx2`
instead."): bench/accuracy.py called ``warnings.filterwarnings("ignore")`` at import, pytest's
collection of tests/unit/clustering imported it, and every warning raised at import for the
rest of the collection (starlette.testclient's among them) was dropped (newcomer34)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SILENCERS = {"filterwarnings", "simplefilter", "resetwarnings"}

TESTCLIENT_RUN = """
import warnings

from starlette.exceptions import StarletteDeprecationWarning   # a UserWarning, not a DeprecationWarning

for category in (DeprecationWarning, PendingDeprecationWarning, StarletteDeprecationWarning):
    warnings.simplefilter("error", category)

from fastapi import FastAPI
from fastapi.testclient import TestClient

app = FastAPI()

@app.get("/ping")
def ping():
    return {"ok": True}

with TestClient(app) as client:
    assert client.get("/ping").json() == {"ok": True}
"""


def test_a_testclient_run_raises_no_deprecation_warning():
    """Every deprecation an error, in a fresh process (the tests' own process may have imported
    starlette.testclient already): a new one fails here by name instead of hiding in a summary."""
    done = subprocess.run(
        [sys.executable, "-c", TESTCLIENT_RUN],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _module_level_silencers(tree: ast.Module) -> list[int]:
    """Lines of calls warnings.filterwarnings/simplefilter/resetwarnings run at import: not in a
    function or class, not under ``with warnings.catch_warnings()``, not under
    ``if __name__ == "__main__"``."""
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and isinstance(item.context_expr.func, ast.Attribute)
                and item.context_expr.func.attr == "catch_warnings" for item in node.items):
            return
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SILENCERS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings"):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_module_changes_the_warning_filters_at_import():
    offenders = []
    for folder in ("bench", "services", "gateway", "scripts", "hearth", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            lines = _module_level_silencers(ast.parse(path.read_text(encoding="utf-8")))
            offenders += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    assert offenders == [], f"warning filters changed at import (they hide warnings from pytest): {offenders}"


def test_the_check_sees_a_filter_set_at_import_and_not_one_in_a_function():
    assert _module_level_silencers(ast.parse('import warnings\nwarnings.filterwarnings("ignore")\n')) == [2]
    assert _module_level_silencers(ast.parse(
        'import warnings\ndef main():\n    warnings.filterwarnings("ignore")\n'
        'with warnings.catch_warnings():\n    warnings.simplefilter("ignore")\n'
        'if __name__ == "__main__":\n    warnings.simplefilter("ignore")\n')) == []
