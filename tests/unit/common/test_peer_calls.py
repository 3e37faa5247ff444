"""Which peers each service probes: those it calls (config.PEER_CALLS), which are the peer
addresses its code dials — the same calls the chart's NetworkPolicies admit
(tests/deploy/test_chart_egress.py holds networkPolicy.peers to them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.common import config, health_report
from services.common.server import register_peer_checks

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("clustering", "attribution", "privacy", "feedback")


def calls_from_code() -> dict[str, set[str]]:
    """The mesh services each component dials, read from its code: the peer addresses
    (`settings.<peer>_addr`) its entry point reads, and privacy for every service but
    privacy itself, whose audit records go to privacy's AppendAudit (the bootstrap's
    sink_for_service; privacy installs a local sink)."""
    entry_points = {name: ROOT / "services" / name / "__main__.py" for name in SERVICES}
    entry_points["gateway"] = ROOT / "gateway" / "app.py"
    address = re.compile(r"settings\.(%s)_addr\b" % "|".join(SERVICES))
    calls = {name: set(address.findall(path.read_text(encoding="utf-8"))) - {name}
             for name, path in entry_points.items()}
    bootstrap = (ROOT / "services" / "common" / "server.py").read_text(encoding="utf-8")
    assert "audit.sink_for_service(name, settings.privacy_addr" in bootstrap, \
        "the bootstrap no longer audits through privacy: update calls_from_code"
    for name in SERVICES:
        if name != "privacy":
            calls[name].add("privacy")
    return calls


def test_peer_calls_are_the_addresses_each_entry_point_dials():
    found = calls_from_code()
    assert found["gateway"] == set(SERVICES) and all(found[name] for name in SERVICES)   # the scan reads something
    assert {name: set(peers) for name, peers in config.PEER_CALLS.items()} == found


@pytest.fixture
def no_checks():
    health_report.clear()
    yield
    health_report.clear()


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_probes_the_health_of_the_peers_it_calls_only(service, no_checks):
    """Until session 32 every service probed all three others; where the chart's
    NetworkPolicies are enforced, a peer it never calls refuses the connection (clustering ->
    attribution, attribution <-> feedback), so those checks failed for good and each such
    service reported itself degraded ("peer attribution: failing" in the gateway's /health)."""
    settings = config.settings_from({}, config.service_settings_class(service))
    names = register_peer_checks(service, settings)
    assert names == [f"peer {peer}" for peer in sorted(config.PEER_CALLS[service])]
    assert sorted(check.name for check in health_report.checks()) == sorted(names)
    assert service not in {name.split(" ", 1)[1] for name in names}
