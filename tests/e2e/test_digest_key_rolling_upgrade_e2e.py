"""A rolling upgrade to session 27 (the erased-id digest key of its own, docs/privacy.md §3
and §10) with a process of the release before it, run from commit 98239b4's tree in the
mesh of this one:

- attribution of the release before (it keys erased-id digests with data key version 1
  itself; its ``Rekey`` answer has no ``digests_keyed_apart``) behind this tree's privacy:
  a household's rotation keeps version 1 (``kept_versions`` [1]) and that attribution's
  erased touchpoints stay duplicates; once attribution is upgraded, the next rotation
  destroys version 1 and they still are;
- privacy of the release before (it ignores ``with_digest_key`` and answers no digest key)
  behind this tree's stores: they derive the digest key from version 1 themselves, and an
  erased device's events stay duplicates, before and after privacy is upgraded.

Works, in both directions: nothing is refused."""

from __future__ import annotations

import subprocess
import time
import uuid

import httpx
import pytest

from bench.assign_cpu import extract
from services.testing.mesh import ROOT
from tests.helpers.waiting import deletion_job

BEFORE_DIGEST_KEY = "98239b4"   # session 26's end: digests keyed from data key version 1
RUN = uuid.uuid4().hex[:6]
# The package mesh's privacy settles a rotation for 70 s (production's); restarted here with 1 s.
QUICK_SETTLE = {"HEARTH_DEK_ROTATION_SETTLE_S": "1"}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _in_history() -> None:
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BEFORE_DIGEST_KEY}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"commit {BEFORE_DIGEST_KEY} (the release this rolling-upgrade test runs beside this one) "
                    f"is not in {ROOT}'s history: a shallow clone or a tarball? Clone the whole history "
                    "(git fetch --unshallow) to run the suite.")


def _restart(mesh, service: str, tree=ROOT, env: dict | None = None) -> None:
    mesh.stop_process(service)
    mesh.root = tree
    saved = mesh.process_env.get(service)
    if env is not None:
        mesh.process_env[service] = {**(saved or {}), **env}
    try:
        mesh.start_service(service)
        mesh.wait_healthy(120)
    finally:
        mesh.root = ROOT
        if env is not None:
            if saved is None:
                mesh.process_env.pop(service, None)
            else:
                mesh.process_env[service] = saved


def _events(acct: str, device: str, n: int, t0: float) -> dict:
    return {"events": [{"event_id": f"{acct}-{device}-{i}", "account_id": acct, "device_id": device,
                        "device_type": "tv", "ts": _iso(t0 + 3 * 3600 * i), "kind": "play_start",
                        "title_id": f"t{i}", "genres": ["drama"], "duration_s": 1200} for i in range(n)]}


def _touchpoints(acct: str, device: str, t0: float) -> dict:
    return {"touchpoints": [{"touchpoint_id": f"{acct}-{device}-tp", "account_id": acct, "device_id": device,
                             "ts": _iso(t0), "channel": "email", "campaign": "spring"}]}


def _post(c, path: str, body: dict) -> tuple[int, int]:
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()["accepted"], r.json()["duplicates"]


def _erase_device(c, acct: str, device: str | None) -> None:
    """The device's deletion (``device`` None: the whole household's), waited for."""
    scope = {"kind": "device", "account_id": acct, "device_id": device} if device else \
        {"kind": "household", "account_id": acct}
    r = c.post("/v1/delete", json={"scope": scope, "reason": "gdpr_art17"})
    assert r.status_code == 202, r.text
    body = deletion_job(c, r.json()["job_id"])
    assert body["state"] == "completed", body


def test_an_older_data_holder_keeps_version_1_alive_and_an_older_privacy_leaves_digests_valid(mesh, tmp_path):
    _in_history()
    old_tree = extract(BEFORE_DIGEST_KEY, tmp_path / "tree")
    acct_a, acct_b, t0 = f"dku-a-{RUN}", f"dku-b-{RUN}", time.time() - 2 * 86400
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as c:
        # (a) attribution of the release before, behind this privacy (1 s settle).
        _restart(mesh, "privacy", env=QUICK_SETTLE)
        _restart(mesh, "attribution", old_tree)
        try:
            for device in ("tv-1", "gone"):
                assert _post(c, "/v1/events", _events(acct_a, device, 2, t0))[0] == 2
                assert _post(c, "/v1/touchpoints", _touchpoints(acct_a, device, t0)) == (1, 0)
            _erase_device(c, acct_a, "gone")
            assert _post(c, "/v1/touchpoints", _touchpoints(acct_a, "gone", t0)) == (0, 1)
            r = c.post(f"/v1/household/{acct_a}/rotate-key")
            assert r.status_code == 200, r.text
            first = r.json()
            assert (first["dek_version"], first["destroyed_versions"], first["kept_versions"]) == (2, [], [1]), first
            assert _post(c, "/v1/touchpoints", _touchpoints(acct_a, "gone", t0)) == (0, 1)
            assert _post(c, "/v1/events", _events(acct_a, "gone", 2, t0)) == (0, 2)
        finally:
            _restart(mesh, "attribution")
        # Every data holder upgraded: the next rotation destroys version 1; digests still match.
        r = c.post(f"/v1/household/{acct_a}/rotate-key")
        assert r.status_code == 200, r.text
        second = r.json()
        assert (second["dek_version"], second["destroyed_versions"], second["kept_versions"]) == \
            (3, [1, 2], []), second
        assert _post(c, "/v1/touchpoints", _touchpoints(acct_a, "gone", t0)) == (0, 1)
        assert _post(c, "/v1/events", _events(acct_a, "gone", 2, t0)) == (0, 2)

        # (b) privacy of the release before, behind this tree's stores.
        _restart(mesh, "privacy", old_tree)
        try:
            for device in ("tv-1", "gone"):
                assert _post(c, "/v1/events", _events(acct_b, device, 2, t0))[0] == 2
                assert _post(c, "/v1/touchpoints", _touchpoints(acct_b, device, t0)) == (1, 0)
            _erase_device(c, acct_b, "gone")
            assert _post(c, "/v1/events", _events(acct_b, "gone", 2, t0)) == (0, 2)
            assert _post(c, "/v1/touchpoints", _touchpoints(acct_b, "gone", t0)) == (0, 1)
            # acct_a's keys were made by this privacy, its digest key with them; the older
            # privacy's shred knows no digest_keys and leaves that row live (review27).
            _erase_device(c, acct_a, None)
        finally:
            _restart(mesh, "privacy")
        # This privacy derives the household's digest key from version 1: the same key.
        for service in ("clustering", "attribution"):   # their cached keys go with a restart
            _restart(mesh, service)
        assert _post(c, "/v1/events", _events(acct_b, "gone", 2, t0)) == (0, 2)
        assert _post(c, "/v1/touchpoints", _touchpoints(acct_b, "gone", t0)) == (0, 1)
        # The household the older privacy erased stays erased under this one: its writes are
        # refused (412, no data key), no key is made for it. Before review27 the live digest
        # key made it read as live with no data key, and GetDataKey created version 4: its
        # events were stored again (200).
        r = c.post("/v1/events", json=_events(acct_a, "after", 2, t0))
        assert r.status_code == 412, r.text
