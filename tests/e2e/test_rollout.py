"""Guarded rollout and automatic rollback through real processes: the mesh, the
`hearth rollout run` controller and the `hearth rollout webhook` Alertmanager receiver,
each its own process. Every step and every rollback is a flag change in the audit log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from services.testing.mesh import ROOT, running_mesh
from services.testing.ports import serve_on_free_port
from tests.helpers.mesh_calls import log_predictions, prediction
from tests.helpers.waiting import SLOW_MACHINE_S, wait_serving


@pytest.fixture(scope="module")
def rollout_mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("rollout-mesh")
    with running_mesh(base, {"rollout-bot": "admin"}, timeout_s=SLOW_MACHINE_S,
                      extra_env={"HEARTH_FEEDBACK_CONTROL_VARIANT": "gmm",
                                 "HEARTH_FEEDBACK_VARIANTS": "kmeans,gmm"}) as mesh:
        yield mesh


def _client(mesh) -> httpx.Client:
    return httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30)


def _env(mesh, env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HEARTH_ROLLOUT_API_KEY": mesh.api_key, **(env or {})}


def _spawn(mesh, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", "rollout", *args], cwd=ROOT, env=_env(mesh, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log_wrong_predictions(mesh, variant: str, n: int, prefix: str) -> None:
    """n predictions of ``variant`` as the clustering service logs them, then feedback
    saying each was wrong: the variant's accuracy becomes 0."""
    log_predictions(mesh, [prediction(f"{prefix}-{i}", f"{prefix}-acc-{i}", variant=variant,
                                      probabilities={"p1": 0.9, "p2": 0.1}) for i in range(n)])
    with _client(mesh) as client:
        for i in range(n):
            r = client.post("/v1/feedback", json={"feedback_id": f"{prefix}-fb-{i}", "prediction_id": f"{prefix}-{i}",
                                                  "kind": "explicit_correct", "true_person_id": "p2",
                                                  "ts": "2026-01-01T00:00:00Z"})
            assert r.status_code == 200, r.text


def _flag_audit_reasons(client: httpx.Client) -> list[str]:
    r = client.get("/v1/audit", params={"event_type": "flag_change", "limit": 100})
    assert r.status_code == 200, r.text
    return [json.dumps(e) for e in r.json()["records"]]


@pytest.mark.timeout(600)
def test_controller_steps_the_challenger_and_rolls_back_on_low_accuracy(rollout_mesh):
    mesh = rollout_mesh
    controller = _spawn(mesh, "run", "--gateway", mesh.url, "--challenger", "kmeans", "--control", "gmm",
                        "--steps", "10,50", "--hold-s", "600", "--check-s", "0.3", "--sustain-s", "0.5",
                        "--min-samples", "5")
    try:
        with _client(mesh) as client:
            deadline = time.monotonic() + SLOW_MACHINE_S
            while client.get("/v1/experiment").json()["traffic"].get("kmeans") != 10.0:
                assert controller.poll() is None, controller.stderr.read()
                assert time.monotonic() < deadline, "the first step never came"
                time.sleep(0.2)
            # The challenger is wrong on every labelled prediction: accuracy 0 < 65 %.
            _log_wrong_predictions(mesh, "kmeans", 6, "roll-ctl")
            # Each of the controller's checks is a GET /v1/experiment that the feedback
            # service answers with a fresh comparison: seconds apiece on a loaded machine.
            out, err = controller.communicate(timeout=2 * SLOW_MACHINE_S)
            assert controller.returncode == 3, err
            result = json.loads(out.strip().splitlines()[-1])
            assert result["outcome"] == "rolled_back" and result["steps"] == [10.0]
            assert "accuracy 0 crosses 0.65" in result["reason"]
            experiment = client.get("/v1/experiment").json()
            assert experiment["kill_switch"] is True
            audited = _flag_audit_reasons(client)
            assert any("rollout step 1/2: kmeans at 10%" in e for e in audited), audited
            assert any("automatic rollback of kmeans" in e for e in audited), audited
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()


def test_alertmanager_webhook_rolls_back_on_a_firing_rollback_alert_only(rollout_mesh, tmp_path):
    mesh = rollout_mesh
    log = tmp_path / "webhook.log"
    hook, port = serve_on_free_port(
        lambda port: [sys.executable, "-m", "services.cli", "rollout", "webhook", "--gateway", mesh.url,
                      "--listen", f"127.0.0.1:{port}"],
        log, "the rollout webhook", cwd=ROOT, env=_env(mesh, {"HEARTH_ROLLOUT_WEBHOOK_TOKEN": "am-secret"}))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(hook, url + "/health", log, "the rollout webhook")
        with _client(mesh) as client:
            assert client.put("/v1/experiment", json={"traffic": {"gmm": 50, "kmeans": 50}, "kill_switch": False,
                                                      "reason": "webhook test split"}).status_code == 200
            auth = {"Authorization": "Bearer am-secret"}
            alert = {"status": "firing", "labels": {"alertname": "HearthRollbackLatency", "action": "rollback",
                                                    "severity": "critical"},
                     "annotations": {"summary": "gateway /v1/assign: p99 212ms crosses the rollback trigger"}}
            payload = {"version": "4", "status": "firing", "receiver": "hearth-rollback", "alerts": [alert]}

            assert httpx.post(url + "/alerts", json=payload).status_code == 401          # no token
            assert httpx.post(url + "/alerts", content=b"{not json", headers=auth).status_code == 400
            resolved = {**payload, "alerts": [{**alert, "status": "resolved"}]}
            assert httpx.post(url + "/alerts", json=resolved, headers=auth).json() == {"action": "none"}
            other = {**payload, "alerts": [{**alert, "labels": {"alertname": "HearthLatencyP95High"}}]}
            assert httpx.post(url + "/alerts", json=other, headers=auth).json() == {"action": "none"}
            assert client.get("/v1/experiment").json()["kill_switch"] is False

            r = httpx.post(url + "/alerts", json=payload, headers=auth)
            assert r.status_code == 200 and r.json()["action"] == "rolled_back", r.text
            assert client.get("/v1/experiment").json()["kill_switch"] is True
            assert any("alert HearthRollbackLatency: gateway /v1/assign: p99 212ms" in e
                       for e in _flag_audit_reasons(client))
    finally:
        hook.terminate()
        hook.wait(10)
