"""Expected bulk readers (session 35): since session 34 only the mesh's own ``svc:``
principals are exempt from ``mass_household_reads``, so an operator's internal reporting
service (a service-role API key asking ``GET /v1/household/{id}`` or
``POST /v1/events/status`` for many households) alerted all day. The operator names such a
principal in ``HEARTH_AUDIT_BULK_READERS`` with its own threshold: through real processes
(gateway -> clustering -> privacy's audit log and detector) the named key reads past the
default 50 households in 10 minutes unalerted, another service key reading as many alerts,
and the named key still alerts once past its own threshold (a stolen bulk key is not
unlimited). Session 36: the two are told apart in privacy's hearth_security_alerts_total by
the bounded label ``threshold`` (default | bulk_reader; never the principal), and a real
Prometheus scraping privacy with the chart's rules fires HearthSecurityAlert for the other
key and HearthBulkReaderOverThreshold for the bulk reader."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.testing.mesh import running_mesh, write_api_key
from tests.helpers.prometheus import firing, running_prometheus
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for

DEFAULT = 50      # DetectorThresholds.distinct_households
REPORTING = 80    # the bulk reader's own threshold in this mesh


def _alerts(admin: httpx.Client, principal: str) -> list[dict]:
    r = admin.get("/v1/audit", params={"event_type": "security_alert", "resource_prefix": f"principal:{principal}"})
    assert r.status_code == 200, r.text
    return [rec["details"] for rec in r.json()["records"]]


def _read(url: str, key: str, prefix: str, households: range) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
        for i in households:
            assert client.get(f"/v1/household/{prefix}-{i}").status_code == 404


def _wait_alert(admin: httpx.Client, principal: str) -> list[dict]:
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:
        found = _alerts(admin, principal)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _security_alerts(mesh) -> dict[tuple[str, str], float]:
    """privacy's hearth_security_alerts_total, scraped from its metrics port: (kind, threshold)
    -> count, and nothing but those two labels."""
    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports['privacy']}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hearth_security_alerts_total":
                assert set(sample.labels) == {"kind", "threshold"}, sample.labels
                found[(sample.labels["kind"], sample.labels["threshold"])] = sample.value
    return found


def test_a_configured_bulk_reader_alerts_only_past_its_own_threshold(tmp_path):
    env = {"HEARTH_AUDIT_BULK_READERS": json.dumps({"reporting-svc": REPORTING})}
    with running_mesh(tmp_path / "mesh", {"olivia": "admin"}, timeout_s=120, extra_env=env) as mesh, \
            running_prometheus(tmp_path / "prometheus",
                               [(f"127.0.0.1:{mesh.metrics_ports['privacy']}", "privacy")]) as prometheus, \
            httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as admin:
        keys = mesh.data_dir / "gateway-keys.json"
        reporting = write_api_key(keys, "reporting-svc", "service")
        other = write_api_key(keys, "other-svc", "service")
        time.sleep(1.5)   # HEARTH_API_KEYS_RELOAD_S
        _read(mesh.url, reporting, "bulk-r", range(DEFAULT + 10))
        _read(mesh.url, other, "bulk-o", range(DEFAULT + 10))
        # The other key's alert is there: every earlier read of the gateway's sink has been judged too.
        other_alerts = _wait_alert(admin, "other-svc")
        assert [(a["kind"], a["count"]) for a in other_alerts] == [("mass_household_reads", DEFAULT)], other_alerts
        assert _alerts(admin, "reporting-svc") == []
        MASS = "mass_household_reads"
        assert _security_alerts(mesh)[(MASS, "default")] == 1.0
        assert _security_alerts(mesh)[(MASS, "bulk_reader")] == 0.0
        assert [a["threshold"] for a in other_alerts] == ["default"]
        security = wait_for(lambda: firing(prometheus, "HearthSecurityAlert"), timeout_s=SLOW_MACHINE_S,
                            what="HearthSecurityAlert firing in Prometheus")
        assert [(a["kind"], a["severity"], a["namespace"]) for a in security] == [(MASS, "warning", "e2e")]
        assert firing(prometheus, "HearthBulkReaderOverThreshold") == []
        # Past its own threshold the bulk reader alerts like anyone.
        _read(mesh.url, reporting, "bulk-r", range(DEFAULT + 10, REPORTING + 5))
        reporting_alerts = _wait_alert(admin, "reporting-svc")
        assert [(a["kind"], a["count"]) for a in reporting_alerts] == [("mass_household_reads", REPORTING)], \
            reporting_alerts
        # ... and an operator tells it apart: its own label value and its own (critical) alert.
        assert [a["threshold"] for a in reporting_alerts] == ["bulk_reader"]
        assert _security_alerts(mesh)[(MASS, "bulk_reader")] == 1.0
        assert _security_alerts(mesh)[(MASS, "default")] == 1.0
        bulk = wait_for(lambda: firing(prometheus, "HearthBulkReaderOverThreshold"), timeout_s=SLOW_MACHINE_S,
                        what="HearthBulkReaderOverThreshold firing in Prometheus")
        assert [(a["severity"], a["namespace"]) for a in bulk] == [("critical", "e2e")]
        assert "reporting-svc" not in json.dumps(bulk) and "bulk-r" not in json.dumps(bulk)
