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

Works, in both directions: nothing is refused. Also here, as it restarts privacy with the
same short settle: a second clustering process's key cache after one household's rotation."""

from __future__ import annotations

import time
import uuid

import httpx

from bench.assign_cpu import extract
from tests.helpers.history import require_commit
from tests.helpers.mesh_calls import privacy_calls, restart_service as _restart
from tests.helpers.waiting import deletion_job
from tests.helpers.timestamps import iso_utc as _iso

BEFORE_DIGEST_KEY = "98239b4"   # session 26's end: digests keyed from data key version 1
RUN = uuid.uuid4().hex[:6]
# The package mesh's privacy settles a rotation for 70 s (production's); restarted here with 1 s.
QUICK_SETTLE = {"HEARTH_DEK_ROTATION_SETTLE_S": "1"}


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


def _with_an_erased_device(c, acct: str, t0: float) -> None:
    """Events and a touchpoint of devices ``tv-1`` and ``gone``, then ``gone`` erased."""
    for device in ("tv-1", "gone"):
        assert _post(c, "/v1/events", _events(acct, device, 2, t0))[0] == 2
        assert _post(c, "/v1/touchpoints", _touchpoints(acct, device, t0)) == (1, 0)
    _erase_device(c, acct, "gone")


def _erase_device(c, acct: str, device: str | None) -> None:
    """The device's deletion (``device`` None: the whole household's), waited for."""
    scope = {"kind": "device", "account_id": acct, "device_id": device} if device else \
        {"kind": "household", "account_id": acct}
    r = c.post("/v1/delete", json={"scope": scope, "reason": "gdpr_art17"})
    assert r.status_code == 202, r.text
    body = deletion_job(c, r.json()["job_id"])
    assert body["state"] == "completed", body


def test_an_older_data_holder_keeps_version_1_alive_and_an_older_privacy_leaves_digests_valid(mesh, tmp_path):
    require_commit(BEFORE_DIGEST_KEY)
    old_tree = extract(BEFORE_DIGEST_KEY, tmp_path / "tree", own_protos=True)
    acct_a, acct_b, t0 = f"dku-a-{RUN}", f"dku-b-{RUN}", time.time() - 2 * 86400
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as c:
        # (a) attribution of the release before, behind this privacy (1 s settle).
        _restart(mesh, "privacy", env=QUICK_SETTLE)
        _restart(mesh, "attribution", old_tree)
        try:
            _with_an_erased_device(c, acct_a, t0)
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
            _with_an_erased_device(c, acct_b, t0)
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


def test_a_rotation_makes_another_clustering_replica_refetch_only_that_households_key(mesh):
    """Two clustering processes on one database: a second replica caches the keys of 20
    households it writes for; one household's data key is rotated (privacy's Rekey reaches
    the first replica). Writing for all 20 again, the second replica asks privacy for the
    rotated household's keys only. Until session 27 the first replica's Rekey moved the
    store's global household-erasure count and the second refetched all 20: 20 GetDataKey
    calls with both clustering processes from 98239b4's tree, 1 with this one's
    (docs/benchmarks.md)."""
    import grpc

    from hearth.clustering.v1 import clustering_pb2 as cpb
    from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
    from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role
    from services.common.pbutil import float_to_ts

    accounts = [f"kc-{RUN}-{i:02d}" for i in range(20)]
    pipeline = Principal("key-cache-pipeline", Role.SERVICE)
    env = mesh.env()
    _restart(mesh, "privacy", env=QUICK_SETTLE)
    try:
        port = mesh.spawn_on_free_ports("clustering-2", "services.clustering", env,
                                        ("HEARTH_GRPC_PORT", "HEARTH_METRICS_PORT"))["HEARTH_GRPC_PORT"]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = cpb_grpc.ClusteringServiceStub(channel)

        def write(round_: int) -> None:
            metadata = [(PRINCIPAL_KEY, pipeline.id), (ROLE_KEY, pipeline.role.value),
                        (TOKEN_KEY, mesh.signer("gateway").sign(pipeline, audience="clustering"))]
            for account in accounts:
                event = cpb.ViewingEvent(event_id=f"{account}-{round_}", account_id=account, device_id="tv",
                                         ts=float_to_ts(time.time() - 3600 + round_), device_type=cpb.DEVICE_TYPE_TV,
                                         kind=cpb.EVENT_KIND_PLAY_START, title_id="t", genres=["drama"],
                                         duration_s=600)
                done = stub.IngestEvents(iter([cpb.IngestEventsRequest(events=[event])]), metadata=metadata,
                                         timeout=60)
                assert done.accepted == 1

        write(1)                                  # the second replica caches every household's keys
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as c:
            r = c.post(f"/v1/household/{accounts[0]}/rotate-key")
            assert r.status_code == 200 and r.json()["dek_version"] == 2, r.text
        before = privacy_calls(mesh)["GetDataKey"]
        write(2)
        calls = privacy_calls(mesh)["GetDataKey"] - before
        print(f"GetDataKey calls while a second clustering replica wrote for 20 households after one "
              f"household's rotation: {calls:.0f}")
        # The rotated household's newest key and its new version by number; a few more may come
        # from the mesh's own background work (the first replica's refits, attribution).
        assert calls <= 6, calls
        channel.close()
    finally:
        mesh.stop_process("clustering-2")
        _restart(mesh, "privacy")
