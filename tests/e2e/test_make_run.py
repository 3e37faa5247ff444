"""`make run` as a newcomer uses it: the mesh comes up, the printed curl examples work, and
when the launcher dies (a closed terminal, `timeout make run`) nothing is left running.

The launcher here is a shell that runs scripts/run.py the way make does (as its child, not
exec'd), on free ports and a temporary data directory so it can run beside a real `make run`.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.common.child_process import spawn_tied
from tests.helpers.processes import alive, descendants, follow_output

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_the_printed_examples_and_dies_with_its_launcher(tmp_path):
    launcher = spawn_tied(
        ["bash", "-c", '"$0" scripts/run.py --data-dir "$1" --free-ports --log-max-bytes 16000 '
                       '--log-backups 2; exit 0',
         sys.executable, str(tmp_path / "var")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, up = follow_output(launcher)
    run_py: list[int] = []
    try:
        assert up.wait(240), "make run did not come up:\n" + "".join(lines)
        out = "".join(lines)
        url = re.search(r"Hearth is up: gateway (http://127\.0\.0\.1:\d+)", out).group(1)
        key = re.search(r"Demo API key \(admin\): (\S+)", out).group(1)
        for service in ("clustering", "attribution", "privacy", "feedback"):
            assert re.search(rf"{service}\s+grpc 127\.0\.0\.1:\d+ .* SERVING", out), out
        # README: "a fresh demo API key (only its hash is stored, in var/gateway-keys.json)".
        stored = (tmp_path / "var" / "gateway-keys.json").read_text()
        assert key not in stored and hashlib.sha256(key.encode()).hexdigest() in stored, stored

        # The README's first two curl calls, as printed.
        event = {"event_id": "e1", "account_id": "acc-1", "device_id": "tv-1",
                 "device_type": "tv", "ts": "2026-11-01T20:15:00Z", "kind": "play_start",
                 "title_id": "t-42", "genres": ["drama"], "duration_s": 1800,
                 "maturity": "adult"}
        headers = {"X-API-Key": key}
        r = httpx.post(f"{url}/v1/events", json={"events": [event]}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1, r.text
        r = httpx.get(f"{url}/v1/household/acc-1", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["account_id"] == "acc-1" and body["devices"][0]["device_id"] == "tv-1", r.text

        # A second `make run` on the same data dir (attack25) is refused at once and leaves the
        # first one's key working: until then it came up beside it on the same files and
        # replaced the demo key, so the first mesh's printed key answered 401.
        second = subprocess.Popen([sys.executable, "scripts/run.py", "--data-dir", str(tmp_path / "var"),
                                   "--free-ports"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            said, _ = second.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            second.send_signal(signal.SIGINT)
            said, _ = second.communicate(timeout=120)
            raise AssertionError("a second make run on the same data dir came up:\n" + said) from None
        assert second.returncode == 1 and "already running" in said and "--data-dir" in said, said
        r = httpx.get(f"{url}/v1/household/acc-1", headers=headers, timeout=30)
        assert r.status_code == 200, r.text

        # The logs are bounded (ops33): keyless requests (an access line each, ~300 bytes; their
        # security-event lines are coalesced since session 34, one a minute) rotate the gateway's
        # log past --log-max-bytes; until session 33 it grew without end (~190 MB/h at 80
        # requests/s filled the data dir's disk).
        logs = tmp_path / "var" / "logs"
        for _ in range(120):
            assert httpx.get(f"{url}/v1/household/acc-1", timeout=30).status_code == 401
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (logs / "gateway.log.1").exists():
            time.sleep(0.2)
        assert (logs / "gateway.log.1").exists(), sorted(p.name for p in logs.iterdir())
        assert not (logs / "gateway.log.3").exists()
        assert (logs / "gateway.log").stat().st_size < 16000 + 60 * 1000
        r = httpx.get(f"{url}/v1/household/acc-1", headers=headers, timeout=30)
        assert r.status_code == 200, r.text   # the gateway writes on into its emptied log

        run_py += [p for p in descendants(launcher.pid)
                   if "scripts/run.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode()]
        assert len(run_py) == 1
        mesh = descendants(run_py[0])
        assert len(mesh) >= 5, "four services and the gateway"

        os.kill(launcher.pid, signal.SIGKILL)   # the launcher dies; nobody sends Ctrl-C
        launcher.wait(10)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(alive(p) for p in [*run_py, *mesh]):
            time.sleep(0.5)
        left = [p for p in [*run_py, *mesh] if alive(p)]
        assert left == [], f"still running after the launcher died: {left}\n" + "".join(lines)
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the gateway still answers after make run's launcher died")
        except httpx.TransportError:
            pass
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in [*run_py, *descendants(launcher.pid)]:  # the mesh is tied to run.py
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_process_exiting_stops_the_mesh_naming_it_and_make_run_fails(tmp_path):
    """README: `make run` stops every process when any one of them exits, naming which
    ("privacy exited with code -9; see var/logs/privacy.log") — and, since session 34, exits
    1: until then it said so and exited 0, so `make run` in a script or a supervisor looked
    like a clean stop after a crash."""
    run = spawn_tied([sys.executable, "scripts/run.py", "--data-dir", str(tmp_path / "var"), "--free-ports"],
                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, up = follow_output(run)
    mesh: list[int] = []
    try:
        assert up.wait(240), "scripts/run.py did not come up:\n" + "".join(lines)
        mesh = descendants(run.pid)
        privacy = [p for p in mesh if b"services.privacy" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(privacy) == 1 and len(mesh) >= 5, mesh
        os.kill(privacy[0], signal.SIGKILL)
        code = run.wait(120)
        out = "".join(lines)
        assert f"privacy exited with code -9; see {tmp_path / 'var' / 'logs'}/privacy.log" in out, out
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(p) for p in mesh):
            time.sleep(0.5)
        assert [p for p in mesh if alive(p)] == [], "the rest of the mesh still runs:\n" + out
        assert code == 1, out
    finally:
        if run.poll() is None:
            run.kill()
        for pid in mesh:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
