"""When the off-site ledger's exports stop, an operator learns it (HearthLedgerExportStale):
`hearth ledger export` notes each export in privacy's database once its file is in place,
and the running privacy service exports the time as
hearth_ledger_last_export_timestamp_seconds — through real processes (the CLI and the
service). Until session 34 nothing said the CronJob kept failing until a restore found the
newest copy stale."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import time

import httpx

from services.testing.mesh import ROOT, Mesh
from tests.e2e.test_restore_drill import _hearth
from tests.helpers.waiting import wait_for

GAUGE = "hearth_ledger_last_export_timestamp_seconds"


def _gauge(mesh: Mesh) -> float:
    def scraped():
        assert mesh.processes["privacy"].poll() is None, mesh.log_tail("privacy")
        try:
            return httpx.get(f"http://127.0.0.1:{mesh.metrics_ports['privacy']}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None

    for line in wait_for(scraped, what="privacy's /metrics").splitlines():
        if line.startswith(GAUGE + " "):
            return float(line.split()[1])
    raise AssertionError(f"{GAUGE} not exported")


def test_the_privacy_service_exports_the_last_ledger_exports_time(tmp_path):
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    mesh.data_dir.mkdir(parents=True)
    try:
        mesh.start_listening(["privacy"])   # alone: its peers' absence only degrades its health
        assert math.isnan(_gauge(mesh))   # none recorded: HearthLedgerExportStale cannot fire
        before = time.time()
        # A copy made by hand (no --off-site) is not the off-site export: it leaves the gauge
        # (review34: it was noted, and reset the alert's clock while the off-site file aged).
        _hearth(mesh, "ledger", "export", "--out", str(tmp_path / "by-hand.json"))
        assert math.isnan(_gauge(mesh))
        first = _hearth(mesh, "ledger", "export", "--out", str(tmp_path / "offsite" / "deletion-ledger.json"),
                        "--off-site")
        assert before - 1 <= first["exported_at"] <= time.time() + 1, first
        assert _gauge(mesh) == first["exported_at"]
        time.sleep(1.1)
        second = _hearth(mesh, "ledger", "export", "--out", str(tmp_path / "offsite" / "deletion-ledger.json"),
                         "--off-site")
        assert second["exported_at"] > first["exported_at"]
        assert _gauge(mesh) == second["exported_at"]   # the last one, not the first

        # An export whose file is written but whose time cannot be noted fails, saying so,
        # and the gauge stays where it was (the alert then fires rather than a silent pass).
        # (A write the database refuses, as a full disk's would; reads still work.)
        with sqlite3.connect(mesh.data_dir / "privacy.db") as db:
            db.execute("CREATE TRIGGER refused BEFORE INSERT ON ledger_exports "
                       "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        done = subprocess.run([sys.executable, "-m", "services.cli", "ledger", "export", "--out",
                               str(tmp_path / "offsite" / "third.json"), "--off-site"], cwd=ROOT, env=mesh.env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, done.stdout + done.stderr
        assert "the ledger was written, but its export could not be recorded in the privacy database" in done.stderr
        assert (tmp_path / "offsite" / "third.json").exists()
        assert "database or disk is full" in done.stderr
        assert _gauge(mesh) == second["exported_at"]
    finally:
        mesh.stop()
