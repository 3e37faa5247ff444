"""No service imports another service's modules (issue 13).

Every module under ``services/`` and ``gateway/`` is parsed (``ast``; nothing is
imported) and each import — module level or inside a function, absolute or relative —
is resolved to a dotted name and checked against the rule:

- ``services/<svc>/**`` may import ``services.<svc>``, ``services.common`` and the
  generated ``hearth.*`` protos; never ``services.<other>``.
- ``services/common/**`` is shared by all and imports no service.
- ``gateway/**`` talks to services over gRPC only: it may import ``services.common``
  (errors, identity, ids, permissions, client plumbing) and the protos, plus the one
  entry in ``GATEWAY_ALLOWED`` below, each with its reason.
- Composition roots that start or combine services on purpose (the umbrella CLI and
  the test harnesses) are listed in ``COMPOSITION_ROOTS``; they import what they start.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("attribution", "clustering", "feedback", "privacy")

# The umbrella ``hearth`` CLI (dispatches to each service's CLI) and the test harnesses
# (start every service): importing several services is their job.
COMPOSITION_ROOTS = {
    "services/cli.py",
    "services/testing/mesh.py",
    "services/testing/inprocess.py",
}

# gateway module -> service modules it may import, with the reason.
GATEWAY_ALLOWED = {
    # The feature-vector wire encoding (float32 bytes + schema version) is part of the
    # clustering API contract: the gateway encodes a client's vector exactly as the
    # clustering service decodes it, from the same module, so the two cannot drift.
    "gateway/routes/clustering.py": {"services.clustering.domain.features"},
}


def _modules() -> list[Path]:
    files = sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "gateway").rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def _package_of(path: Path, root: Path) -> list[str]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1]  # the package the module lives in (an __init__ is its own package)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(path, root)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from a.b import c": c may be a module or a name in a.b; a.b.c covers both
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def violations_of(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    if rel in COMPOSITION_ROOTS:
        return []
    parts = rel.split("/")
    owner = parts[1] if parts[0] == "services" and len(parts) > 2 else None
    bad = []
    for name in sorted(imports_of(path, root)):
        segments = name.split(".")
        if segments[0] != "services" or len(segments) < 2 or segments[1] not in SERVICES:
            continue  # stdlib, third party, protos, services.common, the services package itself
        if parts[0] == "gateway":
            if not any(name == allowed or name.startswith(allowed + ".")
                       for allowed in GATEWAY_ALLOWED.get(rel, ())):
                bad.append(f"{rel} imports {name}")
        elif segments[1] != owner:
            bad.append(f"{rel} imports {name}")
    return bad


def test_no_service_imports_another_services_modules():
    bad = [v for path in _modules() for v in violations_of(path)]
    assert not bad, "cross-service imports (move shared code to services/common):\n" + "\n".join(bad)


def test_the_allow_lists_name_real_files():
    for rel in COMPOSITION_ROOTS | set(GATEWAY_ALLOWED):
        assert (ROOT / rel).is_file(), f"stale allow-list entry {rel}"


@pytest.mark.parametrize(("where", "source", "expected"), [
    ("services/feedback/x.py", "from services.clustering.domain.events import check_id\n", True),
    ("services/feedback/x.py", "def f():\n    import services.privacy.consent.app\n", True),
    ("services/privacy/domain/x.py", "from ...clustering import app\n", True),
    ("services/common/x.py", "from services.feedback.domain import recalibration\n", True),
    ("gateway/x.py", "from services.attribution.domain.records import Touchpoint\n", True),
    ("services/feedback/x.py", "from services.common.ids import check_id\nfrom . import store\n", False),
    ("services/privacy/domain/x.py", "from .audit import format_ts\nfrom ..settings import S\n", False),
    ("gateway/x.py", "from services.common import errors\nfrom hearth.clustering.v1 import clustering_pb2\n", False),
])
def test_the_checker_catches_cross_imports(tmp_path, where, source, expected):
    # The rule itself is tested on small files so a broken checker cannot pass silently.
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert bool(violations_of(path, tmp_path)) is expected
