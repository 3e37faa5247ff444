"""Which peers each service probes: those it calls (config.PEER_CALLS), which are the peer
addresses its code dials — the same calls the chart's NetworkPolicies admit
(tests/deploy/test_chart_egress.py holds networkPolicy.peers to them)."""

from __future__ import annotations

import pytest

from services.common import config, health_report
from services.common.server import register_peer_checks
from tests.deploy.test_chart_egress import calls_from_code

SERVICES = ("clustering", "attribution", "privacy", "feedback")


def test_peer_calls_are_the_addresses_each_entry_point_dials():
    assert {name: set(peers) for name, peers in config.PEER_CALLS.items()} == calls_from_code()


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
