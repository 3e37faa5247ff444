"""Static checks of deploy/Dockerfile (no Docker daemon here to build it) and of the
helm bootstrap script. The Dockerfile checks tie it to the repository and the chart:
it must copy everything the processes import, generate the protobuf code at build,
and run as the non-root uid the chart's securityContext declares."""

from __future__ import annotations

import ast
import re
import subprocess

import yaml

from tests.deploy.conftest import CHART, HELM_TOOLS, ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _first_party_imports(package: str) -> set[str]:
    """Top-level module names imported anywhere under ``package``/."""
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_runtime_stage_runs_as_the_non_root_uid_the_chart_declares():
    runtime = _stages()[-1]
    users = [args for word, args in runtime if word == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    pod = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert int(uid) == pod["runAsUser"]
    assert gid and int(gid) == pod["runAsGroup"]


def test_protobuf_code_is_generated_at_build_before_the_package_install():
    build = _stages()[0]
    runs = [args for word, args in build if word == "RUN"]
    gen = next(i for i, args in enumerate(runs) if "scripts/gen_protos.py" in args)
    install = next(i for i, args in enumerate(runs) if re.search(r"pip install (--no-deps )?\.", args))
    assert gen < install, "the hearth package (generated code) must exist before pip install ."


def test_image_contains_every_first_party_package_the_processes_import():
    copied = {args.split()[0] for word, args in _instructions()
              if word == "COPY" and not args.startswith("--from")}
    top_levels = {p.split("/")[0] for p in copied}
    first_party = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    first_party |= {"hearth"}  # generated at build from protos/
    needed = (_first_party_imports("services") | _first_party_imports("gateway")) & first_party
    # hearth/ is generated inside the image; everything else must be copied in.
    assert needed - {"hearth"} <= top_levels, f"imported but not copied: {needed - {'hearth'} - top_levels}"
    assert "protos" in top_levels
    for source in copied:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_build_context_excludes_local_state():
    ignore = DOCKERIGNORE.read_text().splitlines()
    # Everything excluded first, then only what the Dockerfile copies is let back in:
    # .venv, var/ (SQLite data, API key files) and .tools/ can never reach the image.
    assert ignore[[line.strip() for line in ignore].index("**")] == "**"
    allowed = {line[1:].split("/")[0] for line in ignore if line.startswith("!")}
    assert not allowed & {".venv", "var", ".tools", ".git", "certs"}


def test_helm_tools_is_idempotent_and_prints_the_binary(helm):
    done = subprocess.run(["bash", str(HELM_TOOLS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == helm
    assert helm == str(ROOT / ".tools" / "bin" / "helm")
    version = subprocess.run([helm, "version", "--template", "{{.Version}}"], capture_output=True,
                             text=True, timeout=30).stdout
    pinned = re.search(r'^HELM_VERSION="(v[0-9.]+)"', HELM_TOOLS.read_text(), re.M).group(1)
    assert version == pinned
    assert ".tools/" in (ROOT / ".gitignore").read_text().splitlines()
