"""A rolling upgrade to session 27 with a privacy of the release before it (commit
98239b4's tree, session 26's end, on its own generated protos as it shipped) behind this
tree's gateway: privacy has no RequestDataKeyRotations (UNIMPLEMENTED; until session 34
this test ran it on this checkout's protos, and its permission matrix answered
PERMISSION_DENIED instead), so ``POST /v1/keys/rotate-households`` runs the batch the old way,
inside the call (``RotateDataKeys``: 200 with ``rotated``), as docs/operations.md,
"Rolling upgrades", says. With this tree's privacy back, the same request is a job (202)."""

from __future__ import annotations

import httpx

from bench.assign_cpu import extract
from services.testing.mesh import ROOT
from tests.helpers.history import require_commit
from tests.helpers.logs import json_log_lines

BEFORE_JOBS = "98239b4"   # session 26's end: RotateDataKeys only


def test_a_gateway_in_front_of_a_privacy_without_the_job_runs_the_batch_inside_the_call(mesh, tmp_path):
    require_commit(BEFORE_JOBS)
    old_tree = extract(BEFORE_JOBS, tmp_path / "tree", own_protos=True)
    body = {"older_than_days": 36500, "limit": 5}   # no key is that old: an empty batch
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as c:
        mesh.stop_process("privacy")
        mesh.root = old_tree
        try:
            mesh.start_service("privacy")
            mesh.wait_healthy(120)
            old = c.post("/v1/keys/rotate-households", json=body)
        finally:
            mesh.stop_process("privacy")
            mesh.root = ROOT
            mesh.start_service("privacy")
            mesh.wait_healthy(120)
        assert old.status_code == 200 and old.json() == {"rotated": []}, old.text
        # ledger35: the fallback is logged, naming the code the older privacy answered (it
        # logged nothing until session 35).
        logged = json_log_lines(mesh.log_dir / "gateway.log", logger="hearth.gateway.upgrade",
                                rpc="RequestDataKeyRotations")
        assert [(line["code"], line["fallback"]) for line in logged] == [("UNIMPLEMENTED", "RotateDataKeys")], logged
        new = c.post("/v1/keys/rotate-households", json=body)
        assert new.status_code == 202 and new.json()["state"] == "completed", new.text
        assert new.json()["households"] == [] and new.headers["location"].endswith(new.json()["job_id"])
