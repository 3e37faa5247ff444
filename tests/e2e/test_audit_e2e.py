"""The audit log end to end: an HTTP request through the gateway becomes audit entries
(written by the services' interceptors, batched asynchronously to privacy) carrying the
request's principal, role and trace id; refused requests are audited by the gateway;
the exported log verifies offline with the service's public key."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from services.privacy import cli
from tests.helpers.waiting import SLOW_MACHINE_S

# Every poll waits for records that must arrive: it returns as soon as they have (8 s was
# short when the sinks' batches reached a privacy service busy on a loaded machine).
POLL_S = SLOW_MACHINE_S


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=10) as c:
        yield c


def _poll(client: httpx.Client, predicate, **params) -> list[dict]:
    """GET /v1/audit until ``predicate(records)`` holds (the sinks flush every ~50 ms)."""
    deadline = time.monotonic() + POLL_S
    while True:
        response = client.get("/v1/audit", params={"limit": 1000, **params})
        assert response.status_code == 200, response.text
        records = response.json()["records"]
        if predicate(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_an_http_request_is_audited_with_principal_role_and_trace(client):
    response = client.get("/v1/household/e2e-audit-acc")
    assert response.status_code in (200, 404), response.text
    trace_id = response.headers["x-trace-id"]
    records = _poll(client, lambda rs: any(r["event_type"] == "read_household" for r in rs), trace_id=trace_id)
    read = [r for r in records if r["event_type"] == "read_household"]
    assert read, records
    entry = read[0]
    assert (entry["principal"], entry["role"], entry["trace_id"]) == ("e2e-admin", "admin", trace_id)
    assert entry["resource"] == "household:e2e-audit-acc"
    assert entry["outcome"] == ("success" if response.status_code == 200 else "failure")
    assert entry["details"]["rpc"] == "hearth.clustering.v1.ClusteringService/GetHousehold"
    assert entry["details"]["component"] == "clustering"
    assert len(entry["entry_hash"]) == 64


def test_a_consent_change_is_audited_with_the_new_and_previous_flags(client):
    """Until session 20 the consent_change record held rpc / code / component only: the
    log could not say whether an account withdrew consent or gave it back."""
    account = f"e2e-consent-{uuid.uuid4().hex[:12]}"
    withdraw = client.put(f"/v1/consent/{account}", json={"processing": False, "attribution": True})
    assert withdraw.status_code == 200, withdraw.text
    restore = client.put(f"/v1/consent/{account}", json={"processing": True, "attribution": True})
    assert restore.status_code == 200, restore.text
    records = _poll(client, lambda rs: len(rs) >= 2, event_type="consent_change",
                    resource_prefix=f"household:{account}")
    by_trace = {r["trace_id"]: r for r in records}
    first, second = by_trace[withdraw.headers["x-trace-id"]], by_trace[restore.headers["x-trace-id"]]
    assert (first["principal"], first["outcome"], first["resource"]) == ("e2e-admin", "success", f"household:{account}")
    assert {k: first["details"][k] for k in ("processing", "attribution", "version", "previous")} == {
        "processing": False, "attribution": True, "version": 1, "previous": None}
    assert {k: second["details"][k] for k in ("processing", "attribution", "version", "previous")} == {
        "processing": True, "attribution": True, "version": 2,
        "previous": {"processing": False, "attribution": True}}
    assert second["details"]["rpc"] == "hearth.privacy.v1.Consent/SetConsent"
    assert second["details"]["component"] == "privacy"


def test_authentication_failures_at_the_gateway_are_audited(mesh, client):
    bad = httpx.get(mesh.url + "/v1/household/e2e-audit-acc", headers={"X-API-Key": "hk_not-a-key"}, timeout=10)
    assert bad.status_code == 401
    records = _poll(client, lambda rs: any(r["trace_id"] == bad.headers["x-trace-id"] for r in rs),
                    event_type="authentication_failure")
    mine = [r for r in records if r["trace_id"] == bad.headers["x-trace-id"]]
    assert mine, records
    entry = mine[0]
    assert (entry["principal"], entry["outcome"], entry["resource"]) == (
        "anonymous", "denied", "route:GET /v1/household/{account_id}")
    assert entry["details"]["reason"] == "unknown_api_key" and entry["details"]["component"] == "gateway"


def test_reading_the_audit_log_is_itself_audited(client):
    first = client.get("/v1/audit", params={"limit": 1})
    assert first.status_code == 200
    records = _poll(client, lambda rs: any(r["trace_id"] == first.headers["x-trace-id"] for r in rs),
                    event_type="audit_export")
    assert any(r["trace_id"] == first.headers["x-trace-id"] and r["principal"] == "e2e-admin" for r in records)


def test_export_verifies_offline_with_the_published_key(mesh, client, tmp_path):
    client.get("/v1/household/e2e-audit-export")
    _poll(client, lambda rs: any(r["resource"] == "household:e2e-audit-export" for r in rs),
          resource_prefix="household:e2e-audit-export")
    export = client.get("/v1/audit/export")
    assert export.status_code == 200, export.text
    assert export.headers["content-type"].startswith("application/x-ndjson")
    path = tmp_path / "audit.jsonl"
    path.write_text(export.text)
    lines = export.text.splitlines()
    assert len(lines) - 1 == int(export.headers["x-hearth-audit-tree-size"]) >= 1
    public_key = mesh.data_dir / "audit-signing-key.pub"
    assert cli.main(["audit", "verify", str(path), "--public-key", str(public_key)]) == 0
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines[1:]) + "\n")  # entry 0 removed
    assert cli.main(["audit", "verify", str(tampered), "--public-key", str(public_key)]) == 1



def test_every_process_allocates_its_audit_reserve_file_at_start(mesh):
    """Records held on a full disk survive a kill only if each process took its reserve
    file's blocks while there was room (docs/privacy.md, "The client"; the tests' size)."""
    for component in ("gateway", "clustering", "attribution", "privacy", "feedback"):
        path = mesh.data_dir / f"audit-reserve-{component}.bin"
        assert path.stat().st_size == 256 * 1024, component
        assert path.stat().st_blocks * 512 >= 256 * 1024, component   # allocated, not sparse


@pytest.mark.parametrize("start, end", [("2026-12-01T00:00:00Z", "2026-11-01T00:00:00Z"),
                                        ("2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z")])
def test_an_audit_window_that_selects_nothing_by_construction_is_refused_naming_its_end(client, start, end):
    """attack26: a window whose end is not after its start answered 200 with no records,
    which an investigator reads as "nothing happened then"; the deletion and attribution
    windows already refused it. Now the same 422 naming the field."""
    client.get("/v1/household/audit-window-probe")   # at least one record exists
    response = client.get("/v1/audit", params={"start": start, "end": end})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "end", response.text   # the HTTP field (gRPC: window.end)
    assert "after start" in response.json()["error"]["message"]
