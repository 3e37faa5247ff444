"""A rolling upgrade to session 26 with a process of the release before it
(docs/operations.md, "Rolling upgrades"), run from commit d3fbe5f's tree in the mesh of
this one, on that tree's own generated protos as it shipped: attribution (no
DataHolder/ExportAccountStream: UNIMPLEMENTED — until session 34 this test ran it on this
checkout's protos, and its permission matrix answered PERMISSION_DENIED instead) behind
this tree's privacy, and privacy (no ExportHouseholdStream: UNIMPLEMENTED) behind this
tree's gateway. The export still answers whole: attribution's part through
the unary ExportAccount, the document through the unary ExportHousehold."""

from __future__ import annotations

import time
import uuid

import httpx

from bench.assign_cpu import extract
from services.testing.mesh import ROOT
from tests.helpers.history import require_commit
from tests.helpers.logs import json_log_lines
from tests.helpers.timestamps import iso_utc as _iso

BEFORE_STREAMING = "d3fbe5f"   # session 25's end: ExportAccount only
RUN = uuid.uuid4().hex[:6]


def _household(c, acct: str) -> None:
    t0 = time.time() - 86400
    r = c.post("/v1/events", json={"events": [{
        "event_id": f"{acct}-{i}", "account_id": acct, "device_id": "tv-1", "device_type": "tv",
        "ts": _iso(t0 + 300 * i), "kind": "heartbeat", "title_id": f"t{i}", "genres": ["drama"],
        "duration_s": 300} for i in range(5)]})
    assert r.status_code == 200, r.text
    r = c.post("/v1/touchpoints", json={"touchpoints": [{
        "touchpoint_id": f"{acct}-tp", "account_id": acct, "device_id": "tv-1", "ts": _iso(t0),
        "channel": "email", "campaign": "spring"}]})
    assert r.status_code == 200, r.text


def _export_with_old(mesh, c, service: str, acct: str, tree) -> httpx.Response:
    """GET the export while ``service`` runs from ``tree``; this tree's process is back after."""
    mesh.stop_process(service)
    mesh.root = tree
    try:
        mesh.start_service(service)
        mesh.wait_healthy(120)
        return c.get(f"/v1/household/{acct}/export")
    finally:
        mesh.stop_process(service)
        mesh.root = ROOT
        mesh.start_service(service)
        mesh.wait_healthy(120)


def test_a_data_holder_or_a_privacy_without_the_stream_still_export_whole(mesh, tmp_path):
    require_commit(BEFORE_STREAMING)
    acct = f"rolling-{RUN}"
    old_tree = extract(BEFORE_STREAMING, tmp_path / "tree", own_protos=True)
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60) as c:
        _household(c, acct)
        behind_privacy = _export_with_old(mesh, c, "attribution", acct, old_tree)
        behind_gateway = _export_with_old(mesh, c, "privacy", acct, old_tree)
    assert behind_privacy.status_code == 200, behind_privacy.text
    data = behind_privacy.json()
    assert data["complete"] is True
    assert [t["campaign"] for t in data["services"]["attribution"]["touchpoints"]] == ["spring"]
    assert len(data["services"]["clustering"]["events"]) == 5
    # The release as shipped answers UNIMPLEMENTED (on this checkout's protos: PERMISSION_DENIED).
    assert "attribution has no ExportAccountStream (UNIMPLEMENTED" in (mesh.log_dir / "privacy.log").read_text()
    assert behind_gateway.status_code == 200, behind_gateway.text
    logged = json_log_lines(mesh.log_dir / "gateway.log", logger="hearth.gateway.upgrade", rpc="ExportHouseholdStream")
    assert [(line["code"], line["fallback"]) for line in logged] == [("UNIMPLEMENTED", "ExportHousehold")], logged
    old = behind_gateway.json()
    assert "complete" not in old and old["v"] == 1   # the older privacy's one-message document
    assert [t["campaign"] for t in old["services"]["attribution"]["touchpoints"]] == ["spring"]
    assert len(old["services"]["clustering"]["events"]) == 5
