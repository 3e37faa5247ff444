"""How soon a process sees a peer that has come up (HEARTH_GRPC_RECONNECT_MAX_S caps the
reconnect backoff of every client channel, peer health probes included), and a service's
start-up heap moved out of the cyclic collector's reach before it serves (gc.freeze: its
exit no longer walks scikit-learn/SciPy's objects)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import config, health_report, tls

ROOT = Path(__file__).resolve().parents[3]


def _options() -> dict:
    return dict(tls.channel_options())


def test_channel_options_back_off_from_1_s_to_the_configured_cap():
    try:
        tls.configure(None)   # the production default: 1 s, x1.6, at most 5 s
        assert _options()["grpc.initial_reconnect_backoff_ms"] == 1000
        assert _options()["grpc.max_reconnect_backoff_ms"] == 5000
        config.configure_process(config.settings_from({"HEARTH_GRPC_RECONNECT_MAX_S": "0.25",
                                                       "HEARTH_SERVICE_TOKEN_KEY": "k" * 40}))
        assert _options()["grpc.initial_reconnect_backoff_ms"] == 250
        assert _options()["grpc.max_reconnect_backoff_ms"] == 250
        assert _options()["grpc.lb_policy_name"] == "pick_first"
    finally:
        from services.common import identity

        identity.configure_service_tokens(None)
        tls._configured = None


@pytest.mark.parametrize("value", ["0", "0.01", "121"])
def test_a_reconnect_cap_out_of_range_is_refused(value):
    with pytest.raises(config.ConfigError, match="HEARTH_GRPC_RECONNECT_MAX_S"):
        config.settings_from({"HEARTH_GRPC_RECONNECT_MAX_S": value})


def test_peer_health_probes_use_the_clients_channel_options(monkeypatch):
    """Until session 19 the probe's channel had gRPC's defaults: a peer that had been down
    was retried up to 120 s apart, and health said "failing" that long after it was back."""
    seen = []
    monkeypatch.setattr(tls, "channel", lambda address, options=None, material=None: seen.append(options) or
                        tls.grpc.insecure_channel(address))
    try:
        tls.configure(None, reconnect_max_s=0.5)
        health_report.peer_probe("127.0.0.1:1")
    finally:
        tls._configured = None
    assert dict(seen[0])["grpc.max_reconnect_backoff_ms"] == 500


def test_a_service_freezes_its_start_up_heap_before_serving(tmp_path):
    script = ("import gc\n"
              "from services.common import server\n"
              "server.serve = lambda *a, **k: print('frozen', gc.get_freeze_count())\n"
              "server.run_service('attribution', lambda settings: ([], []))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(HEARTH_METRICS_PORT="0", HEARTH_DATA_DIR=str(tmp_path), HEARTH_SERVICE_TOKEN_KEY="k" * 40,
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    frozen = int(done.stdout.split("frozen")[-1].split()[0])
    assert frozen > 10_000, done.stdout   # every module and class of start-up
