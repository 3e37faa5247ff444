"""Deletion end to end through the gateway, with every service as its own process, on
SQLite files and on PostgreSQL + Redis: each scope (device, person, household, window)
requested with POST /v1/delete and followed with GET /v1/delete/{job}; a remnant scan
of the raw stores (SQLite files, PostgreSQL schemas, Redis keys) afterwards; receipts
checked with the offline CLI; a job interrupted by stopping the clustering service
finishes after its restart; consent refusal; the export."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from services.testing.mesh import ROOT, running_mesh
from tests.helpers.servers import fresh_database, service_logins
from tests.helpers.waiting import SLOW_MACHINE_S, deletion_job, household_erasure_held_at, wait_for
from tests.helpers.timestamps import iso_utc as _iso

DAY = 86400.0
RUN = uuid.uuid4().hex[:6]  # PostgreSQL schemas outlive a mesh: keep accounts unique per run
DATA_SERVICES = ("clustering", "attribution", "feedback")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def dmesh(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"deletion-{request.param}")
    env = {"HEARTH_DELETION_POLL_S": "0.1", "HEARTH_DELETION_RETRY_BASE_S": "0.1",
           "HEARTH_DELETION_RETRY_MAX_S": "0.5", "HEARTH_DELETION_LEASE_S": "5",
           "HEARTH_RETENTION_CHECK_S": "0",
           # Each Erase waits out the erasure fence (3 s in production): a shorter one keeps
           # these meshes' many erasures quick, and still runs it (read every 0.125 s).
           "HEARTH_ERASURE_FENCE_S": "0.5"}
    process_env = {}
    if request.param == "postgres":
        env.update(HEARTH_STORAGE="postgres", HEARTH_POSTGRES_DSN=fresh_database(request.getfixturevalue("postgres_dsn")),
                   HEARTH_REDIS_URL=request.getfixturevalue("redis_url"))
        # Each service under its own login, as deployed (session 28): erasure, purge and
        # receipts with only the grants production has. HEARTH_POSTGRES_DSN above (the
        # fixtures' superuser) is the remnant scan's, which reads every schema.
        process_env = {service: {"HEARTH_POSTGRES_DSN": dsn}
                       for service, dsn in service_logins(env["HEARTH_POSTGRES_DSN"], f"del{RUN}").items()}
    with running_mesh(base, {"olivia": "admin"}, timeout_s=120, extra_env=env, process_env=process_env) as m:
        m.backend = request.param
        m.env_extra = env
        yield m


@pytest.fixture
def client(dmesh):
    with httpx.Client(base_url=dmesh.url, headers={"X-API-Key": dmesh.api_key}, timeout=30) as c:
        yield c


def post_events(client, account: str, device: str, start: float, n: int, prefix: str = "") -> dict:
    body = {"events": [{"event_id": f"{prefix or account}-{device}-{i}", "account_id": account, "device_id": device,
                        "device_type": "tv", "ts": _iso(start + i * 300), "kind": "heartbeat",
                        "title_id": f"title-{i}", "series_id": "show-1", "genres": ["drama"], "duration_s": 300,
                        "maturity": "adult", "country": "FR", "profile_hint": "dad"} for i in range(n)]}
    r = client.post("/v1/events", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def post_touchpoints(client, account: str, items) -> None:
    body = {"touchpoints": [{"touchpoint_id": tid, "account_id": account, "device_id": device, "ts": _iso(ts),
                             "channel": "email", "campaign": "spring", **({"person_id": p} if p else {})}
                            for tid, device, ts, p in items]}
    r = client.post("/v1/touchpoints", json=body)
    assert r.status_code == 200, r.text


def delete(client, scope: dict, timeout_s: float = 60.0) -> dict:
    r = client.post("/v1/delete", json={"scope": scope, "reason": "gdpr_art17"})
    assert r.status_code == 202, r.text
    return poll(client, r.json()["job_id"], timeout_s)


def poll(client, job_id: str, timeout_s: float = 60.0) -> dict:
    return deletion_job(client, job_id, timeout_s)


# ---- raw-store remnant scan ------------------------------------------------------------------

def remnants(dmesh, account: str, device: str | None = None) -> dict[str, int]:
    """Rows of ``account`` (and ``device``) in every table of every data-holding service,
    read straight from the backend, plus Redis keys naming the account."""
    found: dict[str, int] = {}
    where = "account_id = {p}" + (" AND device_id = {p}" if device else "")
    params = (account, device) if device else (account,)
    if dmesh.backend == "sqlite":
        for service in DATA_SERVICES:
            conn = sqlite3.connect(dmesh.data_dir / f"{service}.db")
            try:
                tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for table in tables:
                    cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                    if "account_id" in cols and (device is None or "device_id" in cols):
                        n = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where.format(p='?')}",
                                         params).fetchone()[0]
                        if n:
                            found[f"{service}.{table}"] = n
            finally:
                conn.close()
        return found
    import psycopg
    import redis

    with psycopg.connect(dmesh.env_extra["HEARTH_POSTGRES_DSN"]) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name, array_agg(column_name::text) FROM information_schema.columns "
            "WHERE table_schema IN ('hearth_clustering', 'hearth_attribution', 'hearth_feedback') "
            "GROUP BY table_schema, table_name").fetchall()
        for schema, table, cols in tables:
            if "account_id" in cols and (device is None or "device_id" in cols):
                n = conn.execute(f'SELECT COUNT(*) FROM "{schema}"."{table}" WHERE {where.format(p="%s")}',
                                 params).fetchone()[0]
                if n:
                    found[f"{schema}.{table}"] = n
    keys = [k.decode() for k in redis.Redis.from_url(dmesh.env_extra["HEARTH_REDIS_URL"]).scan_iter("hearth:*")]
    # For a device scope the household's own cached model is not a remnant: the erasure
    # refits it from the remaining sessions (exact unlearning) and caches the result.
    bad = [k for k in keys if account in k and (device is None or device in k
                                                or (k.endswith(account) and ":model:" not in k))]
    if bad:
        found["redis"] = len(bad)
    return found


def count_rows(dmesh, account: str) -> int:
    return sum(remnants(dmesh, account).values())


# ---- tests ---------------------------------------------------------------------------------

def test_each_scope_end_to_end_leaves_no_remnant(dmesh, client):
    t0 = time.time() - 5 * DAY
    acct = f"e2e-del-{RUN}"
    post_events(client, acct, "tv-1", t0, 4)
    post_events(client, acct, "ph-1", t0 + DAY, 3)
    post_events(client, acct, "tab-1", t0 + 3 * DAY, 3)
    post_touchpoints(client, acct, [(f"{acct}-t1", "tv-1", t0, None), (f"{acct}-t2", "ph-1", t0 + DAY, "p2"),
                                    (f"{acct}-t3", "tab-1", t0 + 3 * DAY, None)])
    assert remnants(dmesh, acct, "tv-1")

    job = delete(client, {"kind": "device", "account_id": acct, "device_id": "tv-1"})
    assert job["state"] == "completed", job
    by = {s["service"]: s for s in job["services"]}
    assert by["clustering"]["deleted_counts"] == {"events": 4, "sessions": 1, "devices": 1}
    assert by["attribution"]["deleted_counts"] == {"touchpoints": 1}
    assert remnants(dmesh, acct, "tv-1") == {}
    # A device erasure does not close the household: the same device may send again what it
    # records after the erasure. What it recorded before (a batch in flight, a backlog) stays
    # out, new ids or not (session 31: docs/privacy.md, "What an erased scope recorded").
    before = post_events(client, acct, "tv-1", t0 + 2 * DAY, 2, prefix=f"{acct}-backlog")
    assert (before["accepted"], before["duplicates"]) == (0, 2), before
    assert remnants(dmesh, acct, "tv-1") == {}
    post_events(client, acct, "tv-1", time.time(), 2, prefix=f"{acct}-again")
    assert remnants(dmesh, acct, "tv-1")

    job = delete(client, {"kind": "person", "account_id": acct, "person_id": "p2"})
    assert job["state"] == "completed", job
    assert {s["service"]: s for s in job["services"]}["attribution"]["deleted_counts"] == {"touchpoints": 1}

    job = delete(client, {"kind": "window", "account_id": acct, "start": _iso(t0 + 3 * DAY - 60),
                          "end": _iso(t0 + 4 * DAY)})
    assert job["state"] == "completed", job
    assert remnants(dmesh, acct, "tab-1") == {}
    assert remnants(dmesh, acct, "ph-1")  # outside the window: still there

    job = delete(client, {"kind": "household", "account_id": acct})
    assert job["state"] == "completed", job
    assert job["receipt"]["receipt"]["scope"] == {"kind": "household", "account_id": acct}
    assert remnants(dmesh, acct) == {}
    if dmesh.backend == "postgres":
        # Each service purged under its own role: the WAL step ran (pg_checkpoint granted),
        # not "no privilege to remove WAL segments".
        purges = [p for s in job["receipt"]["receipt"]["services"].values() for p in s.get("purges", [])
                  if p.get("store") == "postgres"]
        assert purges
        for purge in purges:
            assert "no privilege" not in purge["action"], purge["action"]

    # An erased household stays erased: events and touchpoints that arrive later (in flight
    # during the job, or a client still sending) are refused, naming the account once, and
    # nothing is written for them.
    late = {"event_id": f"{acct}-late", "account_id": acct, "device_id": "tv-9", "device_type": "tv",
            "ts": _iso(t0 + 4 * DAY), "kind": "play_start", "title_id": "title-late", "genres": ["drama"],
            "duration_s": 60, "maturity": "adult"}
    for path, body in (("/v1/events", {"events": [late]}),
                       ("/v1/touchpoints", {"touchpoints": [{"touchpoint_id": f"{acct}-late", "account_id": acct,
                                                             "device_id": "tv-9", "ts": _iso(t0 + 4 * DAY),
                                                             "channel": "email", "campaign": "late"}]})):
        r = client.post(path, json=body)
        assert r.status_code == 412, (path, r.text)
        error = r.json()["error"]
        # The refusal names the batch's first item of the erased household (b258ea7), once.
        item_field = f"{path.removeprefix('/v1/')}[0].account_id"
        assert error["field"] == item_field and "erased" in error["message"], error
        assert error["message"].count("account_id") == 1, error
    assert remnants(dmesh, acct) == {}


def test_a_client_that_keeps_sending_during_a_household_deletion_leaves_nothing(dmesh, client):
    """The attacker's (or a chatty device's) view of a deletion: events, touchpoints and
    conversions keep arriving while the household's job runs and after it completed.
    Nothing sent after completion is accepted, and once sending stops nothing of the
    household is in any store. Until session 14 the key was shredded last: writes landing
    between clustering's erase and the shred re-fetched the live key, the store kept it
    cached, and in 2 of 6 tries through the gateway the household took events for
    seconds after its job completed (docs/privacy.md, "Order")."""
    import threading

    acct, t0 = f"e2e-chatty-{RUN}", time.time() - 3 * DAY
    post_events(client, acct, "tv-1", t0, 20)
    sent: list[tuple[float, str, int]] = []          # (sent at, path, status)
    stop = threading.Event()

    def keep_sending() -> None:
        with httpx.Client(base_url=dmesh.url, headers={"X-API-Key": dmesh.api_key}, timeout=30) as c:
            i = 0
            while not stop.is_set():
                ts = _iso(t0 + DAY + i * 60)
                for path, body in (
                        ("/v1/events", {"events": [{"event_id": f"{acct}-s{i}", "account_id": acct,
                                                    "device_id": "tv-chatty", "device_type": "tv", "ts": ts,
                                                    "kind": "heartbeat", "title_id": "t", "genres": ["drama"],
                                                    "duration_s": 60, "maturity": "adult"}]}),
                        ("/v1/touchpoints", {"touchpoints": [{"touchpoint_id": f"{acct}-tp{i}", "account_id": acct,
                                                             "device_id": "tv-chatty", "ts": ts, "channel": "email",
                                                             "campaign": "c"}]}),
                        ("/v1/conversions", {"conversions": [{"conversion_id": f"{acct}-cv{i}", "account_id": acct,
                                                             "ts": ts, "kind": "purchase", "value": 1.0,
                                                             "device_id": "tv-chatty"}]})):
                    at = time.time()
                    sent.append((at, path, c.post(path, json=body).status_code))
                i += 1

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    # Sending (and accepted) before the job starts; until session 22 a fixed 1 s sleep.
    wait_for(lambda: [1 for _, path, status in sent if status == 200 and path == "/v1/conversions"],
             what="a first round of the sender's requests accepted", interval_s=0.05)
    job = delete(client, {"kind": "household", "account_id": acct})
    completed = time.time()
    assert job["state"] == "completed", job
    time.sleep(2.0)
    stop.set()
    sender.join(30)
    during = [status for at, _, status in sent if at < completed]
    after = [(path, status) for at, path, status in sent if at > completed]
    assert 200 in during and after, (len(during), len(after))      # it did keep sending throughout
    assert not [x for x in after if x[1] == 200], after[:5]
    assert {status for _, status in after} <= {412, 429}, sorted({s for _, s in after})
    assert remnants(dmesh, acct) == {}


def test_a_household_erased_before_any_of_its_data_arrived_stays_erased(dmesh, client):
    """attack30: a household deletion that ran before the household's first data was stored
    (its first batch still in flight through the gateway, or an erasure asked at sign-up)
    found no data key to shred, and left nothing behind: the batch, and anything sent after
    the job completed, made it a new key and was stored — the job said completed. Now it
    stays erased as a household that had data does: 412 for each kind, nothing stored."""
    acct = f"e2e-never-{RUN}"
    job = delete(client, {"kind": "household", "account_id": acct})
    assert job["state"] == "completed", job
    ts = _iso(time.time() - DAY)
    for path, body in (
            ("/v1/events", {"events": [{"event_id": f"{acct}-e0", "account_id": acct, "device_id": "tv-1",
                                        "device_type": "tv", "ts": ts, "kind": "heartbeat", "title_id": "t",
                                        "genres": ["drama"], "duration_s": 60, "maturity": "adult"}]}),
            ("/v1/touchpoints", {"touchpoints": [{"touchpoint_id": f"{acct}-tp0", "account_id": acct,
                                                 "device_id": "tv-1", "ts": ts, "channel": "email", "campaign": "c"}]}),
            ("/v1/conversions", {"conversions": [{"conversion_id": f"{acct}-cv0", "account_id": acct, "ts": ts,
                                                 "kind": "purchase", "value": 1.0, "device_id": "tv-1"}]})):
        r = client.post(path, json=body)
        assert r.status_code == 412, (path, r.status_code, r.text)
        assert "destroyed" in r.json()["error"]["message"], r.text
    assert remnants(dmesh, acct) == {}


def test_a_batch_sent_again_after_its_device_was_erased_does_not_bring_the_device_back(dmesh, client):
    """chaos23, driving the mesh as a client that retries: a batch acknowledged before a
    device erasure, sent again after the job completed (a retry after a lost answer, a
    replayed stream), was stored again whole — 20 of 20 of the erased device's events back
    in clustering (`GET /v1/household/{id}/export`), and its touchpoint in attribution, on
    SQLite and PostgreSQL. Now each id an erasure deleted is a duplicate (a keyed digest is
    kept, never the id)."""
    acct, t0 = f"e2e-replay-{RUN}", time.time() - 3 * DAY
    batch = {"events": [{"event_id": f"{acct}-{device}-{i}", "account_id": acct, "device_id": device,
                         "device_type": "tv", "ts": _iso(t0 + i * 300 + offset), "kind": "heartbeat",
                         "title_id": f"title-{i}", "genres": ["drama"], "duration_s": 300, "maturity": "adult"}
                        for device, offset in (("tv-1", 0), ("tab-erased", 60)) for i in range(20)]}
    touchpoints = {"touchpoints": [{"touchpoint_id": f"{acct}-tp-{device}", "account_id": acct, "device_id": device,
                                    "ts": _iso(t0 + 30), "channel": "email", "campaign": "spring"}
                                   for device in ("tv-1", "tab-erased")]}
    assert client.post("/v1/events", json=batch).json()["accepted"] == 40
    assert client.post("/v1/touchpoints", json=touchpoints).json()["accepted"] == 2
    job = delete(client, {"kind": "device", "account_id": acct, "device_id": "tab-erased"})
    assert job["state"] == "completed", job
    replay = client.post("/v1/events", json=batch)
    assert replay.status_code == 200, replay.text
    assert (replay.json()["accepted"], replay.json()["duplicates"]) == (0, 40), replay.json()
    assert client.post("/v1/touchpoints", json=touchpoints).json() == {"accepted": 0, "duplicates": 2,
                                                                         "rejected_expired": 0}
    export = client.get(f"/v1/household/{acct}/export")
    assert export.status_code == 200
    held = export.json()["services"]
    assert "tab-erased" not in json.dumps({k: v for k, v in held.items() if k != "privacy"}), held.keys()
    assert [e["device_id"] for e in held["clustering"]["events"]] == ["tv-1"] * 20
    assert remnants(dmesh, acct, "tab-erased") == {}


def test_a_person_erasure_fences_the_persons_own_device_attribution_never_heard_from(dmesh, client):
    """fence32's "Left": attribution fenced a person's unnamed touchpoints only on the
    devices of its own erased touchpoints, so a touchpoint the person's tablet recorded
    before the erasure and sent after it — the tablet had sent attribution nothing before
    — was stored. Now attribution asks clustering for the person's devices
    (GetPersonDevices) as it erases: that touchpoint is refused. The TV the person shared
    stays fenced, as in session 32, because one of the person's erased touchpoints was on
    it (review33 R8: 2b52840 unfenced it, so an unnamed touchpoint there within the
    person's session was erased if stored before the erasure and kept, later credited to
    another member, if it arrived after): erasure completeness wins over the other
    members' unnamed touchpoints in flight. A shared device the person left no erased
    touchpoint on is not fenced (asserted at the store: tests/integration/
    test_erasure_in_flight.py)."""
    import grpc

    from hearth.clustering.v1 import clustering_pb2 as cpb
    from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
    from services.common.errors import ERROR_FIELD_KEY
    from tests.helpers.mesh_calls import acting_as_service

    acct, t0 = f"e2e-own-device-{RUN}", time.time() - 14 * DAY
    child, _ = _child_with_a_tablet_and_a_shared_tv(client, acct, t0)

    with grpc.insecure_channel(f"127.0.0.1:{dmesh.grpc_ports['clustering']}") as channel:
        stub = cpb_grpc.ClusteringServiceStub(channel)
        metadata = acting_as_service(dmesh, "attribution", "clustering")
        devices = stub.GetPersonDevices(cpb.GetPersonDevicesRequest(account_id=acct, person_id=child),
                                        metadata=metadata, timeout=30)
        assert (list(devices.own_device_ids), list(devices.shared_device_ids)) == (["tab-kids"], ["tv-1"])
        for request, field in ((cpb.GetPersonDevicesRequest(account_id=acct), "person_id"),
                               (cpb.GetPersonDevicesRequest(account_id="bad id", person_id=child), "account_id")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetPersonDevices(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
            assert dict(refused.value.trailing_metadata())[ERROR_FIELD_KEY] == field

    job = delete(client, {"kind": "person", "account_id": acct, "person_id": child})
    assert job["state"] == "completed", job
    assert {s["service"]: s for s in job["services"]}["attribution"]["deleted_counts"] == {"touchpoints": 1}
    late = t0 + 13 * DAY   # recorded before the erasure, sent after it
    assert _touchpoint(client, acct, "tab", "tab-kids", late) == (0, 1)   # the child's own: refused
    assert _touchpoint(client, acct, "tv", "tv-1", late) == (0, 1)        # the erased touchpoint's: refused
    # An erasure is not a ban: what the tablet records after it is stored (2 s on: the API's
    # times are whole seconds, and the fence ends at the instant attribution erased).
    assert _touchpoint(client, acct, "tab-new", "tab-kids", time.time() + 2) == (1, 0)


BEFORE_PERSON_DEVICES = "87c724a"   # session 32's end: clustering without GetPersonDevices


@pytest.mark.parametrize("dmesh", ["sqlite"], indirect=True)   # the release pair, not the backend
def test_a_person_erasure_beside_a_clustering_without_person_devices_completes_as_in_session_32(
        dmesh, client, tmp_path):
    """A rolling upgrade (docs/operations.md, "Upgrading to session 33"): attribution of this
    release asks a clustering of session 32, which does not serve GetPersonDevices
    (UNIMPLEMENTED). The person erasure is not held up or failed by it: the job
    completes, fencing as session 32 did — so the person's tablet, which sent attribution
    nothing, is not fenced (the documented gap a repeat after the upgrade cannot close).
    The fallback is counted (review33 R7): `hearth_person_devices_fallbacks_total` by reason —
    `unimplemented` here, never `permission_denied`, the misconfiguration's
    (HearthPersonDevicesRefused). Until session 34 the old release ran on this checkout's
    generated protos, whose servicer base lists the RPC, so its permission matrix answered
    PERMISSION_DENIED and the docs took that for the upgrade's answer."""
    from bench.assign_cpu import extract
    from tests.helpers.history import require_commit
    from tests.helpers.mesh_calls import restart_service

    def fallbacks() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{dmesh.metrics_ports['attribution']}/metrics", timeout=10).text
        return {m[1]: float(m[2]) for m in re.finditer(
            r'^hearth_person_devices_fallbacks_total\{reason="(\w+)"\} (\S+)$', text, re.M)}

    require_commit(BEFORE_PERSON_DEVICES)
    acct, t0 = f"e2e-own-device-old-{RUN}", time.time() - 14 * DAY
    child, _ = _child_with_a_tablet_and_a_shared_tv(client, acct, t0)
    before = fallbacks()
    # That release as it shipped: with its own generated protos (this checkout's, a superset
    # whose servicer base serves GetPersonDevices, made its permission matrix answer
    # PERMISSION_DENIED, which the release as shipped never does).
    tree = extract(BEFORE_PERSON_DEVICES, tmp_path / "tree", own_protos=True)
    restart_service(dmesh, "clustering", tree)
    try:
        job = delete(client, {"kind": "person", "account_id": acct, "person_id": child})
        assert job["state"] == "completed", job
        assert [s["attempts"] for s in job["services"] if s["service"] == "attribution"] == [0], job   # no failure
    finally:
        restart_service(dmesh, "clustering")
    after = fallbacks()
    assert set(before) == {"permission_denied", "unimplemented", "unauthenticated", "unavailable"}, before   # at 0
    # The older release as shipped answers UNIMPLEMENTED: `unimplemented` (expected during
    # the upgrade), not `permission_denied` (a misconfiguration: HearthPersonDevicesRefused).
    assert {reason: after[reason] - before[reason] for reason in before} == {
        "permission_denied": 0, "unimplemented": 1, "unauthenticated": 0, "unavailable": 0}, (before, after)
    said = (dmesh.log_dir / "attribution.log").read_text(errors="replace")
    assert "GetPersonDevices refused (reason unimplemented" in said, said[-3000:]
    assert _touchpoint(client, acct, "tab", "tab-kids", t0 + 13 * DAY) == (1, 0)   # not fenced
    assert _touchpoint(client, acct, "tv", "tv-1", t0 + 13 * DAY) == (0, 1)   # its erased touchpoint's device


def _child_with_a_tablet_and_a_shared_tv(client, acct: str, t0: float) -> tuple[str, float]:
    """A household whose model found its persons: a child on their tablet in the morning
    and on the TV in the afternoon, a parent on the TV at night (the tablet is the child's
    own, the TV shared); attribution holds a conversion of it and one touchpoint, naming
    nobody, within one of the child's TV sessions (the erasure resolves it to the child),
    none of the tablet. Returns the child's person id and that touchpoint's time."""
    events = [{"event_id": f"{acct}-{device}-{hour}-{d}-{i}", "account_id": acct, "device_id": device,
               "device_type": device_type, "ts": _iso(t0 + d * DAY + hour * 3600 + i * 300), "kind": "heartbeat",
               "title_id": f"{genre}-{d}", "genres": [genre], "duration_s": 300, "maturity": maturity}
              for device, device_type, hour, genre, maturity in (("tab-kids", "tablet", 8, "animation", "kids"),
                                                                  ("tv-1", "tv", 16, "animation", "kids"),
                                                                  ("tv-1", "tv", 21, "drama", "adult"))
              for d in range(12) for i in range(4)]
    assert client.post("/v1/events", json={"events": events}).json()["accepted"] == len(events)
    household = wait_for(lambda: (h := _household(client, acct))["model_version"] >= 1 and h,
                         what="a first model", timeout_s=SLOW_MACHINE_S)
    sessions = household["sessions"]
    child = {s["person_id"] for s in sessions if s["device_id"] == "tab-kids"}
    assert len(child) == 1, sessions
    child = child.pop()
    assert {s["person_id"] for s in sessions if s["device_id"] == "tv-1"} > {child}, sessions   # shared
    on_the_tv = 60 + min(datetime.fromisoformat(s["start"].replace("Z", "+00:00")).timestamp()
                         for s in sessions if s["device_id"] == "tv-1" and s["person_id"] == child)
    assert _touchpoint(client, acct, "tv-child", "tv-1", on_the_tv) == (1, 0)
    r = client.post("/v1/conversions", json={"conversions": [{"conversion_id": f"{acct}-cv", "account_id": acct,
                                                               "ts": _iso(t0 + 5 * DAY), "kind": "purchase",
                                                               "value": 10.0}]})
    assert r.json()["accepted"] == 1, r.text
    return child, on_the_tv


def _touchpoint(client, acct: str, tid: str, device: str, ts: float) -> tuple[int, int]:
    """One touchpoint naming no person: (accepted, duplicates)."""
    r = client.post("/v1/touchpoints", json={"touchpoints": [{
        "touchpoint_id": f"{acct}-{tid}", "account_id": acct, "device_id": device, "ts": _iso(ts),
        "channel": "email", "campaign": "spring"}]})
    assert r.status_code == 200 and r.json()["rejected_expired"] == 0, r.text
    return r.json()["accepted"], r.json()["duplicates"]


def test_receipt_verifies_offline_and_a_forgery_does_not(dmesh, client, tmp_path):
    acct = f"e2e-rcpt-{RUN}"
    post_events(client, acct, "tv-1", time.time() - DAY, 2)
    job = delete(client, {"kind": "household", "account_id": acct})
    assert job["state"] == "completed", job
    public = dmesh.data_dir / "privacy-receipt-signing.pub"
    good, forged = tmp_path / "good.json", tmp_path / "forged.json"
    good.write_text(json.dumps(job["receipt"]))
    tampered = json.loads(json.dumps(job["receipt"]))
    tampered["receipt"]["requested_by"]["principal"] = "someone-else"
    forged.write_text(json.dumps(tampered))

    def verify(path: Path) -> int:
        return subprocess.run([sys.executable, "-m", "services.privacy.cli", "verify-receipt", str(path),
                               "--public-key", str(public)], cwd=ROOT, capture_output=True).returncode

    assert verify(good) == 0
    assert verify(forged) == 1


def test_job_interrupted_by_stopping_clustering_finishes_after_restart(dmesh, client):
    acct = f"e2e-kill-{RUN}"
    post_events(client, acct, "tv-1", time.time() - DAY, 3)
    job_id = household_erasure_held_at(dmesh, client, acct, "clustering")
    body = poll(client, job_id)
    assert body["state"] == "completed", body
    assert remnants(dmesh, acct) == {}


def test_privacy_stops_within_the_pods_grace_while_an_erase_waits_on_a_hung_peer(dmesh, client):
    """SIGTERM to privacy while its deletion worker waits on an Erase that a hung peer
    (clustering, SIGSTOPped) never answers: the process exits within the chart's
    terminationGracePeriodSeconds (20 s: preStop 5 + grace 10 + margin 5) — the call is
    cancelled, the step recorded as a retryable failure — and the job completes after the
    restart. Until session 20 it waited out the Erase deadline (HEARTH_DELETION_ERASE_
    TIMEOUT_S, 60 s): exit after 57 s, so Kubernetes SIGKILLed it before its audit log
    and database were closed. (Until session 21 the exit also included the gRPC server's
    stop waiting up to the 10 s grace for a call the frozen peer was sending when it
    stopped: tests/e2e/test_stop_hung_peer_e2e.py.)"""
    import os
    import signal

    acct = f"e2e-hung-{RUN}"
    post_events(client, acct, "tv-1", time.time() - DAY, 3)
    clustering = dmesh.processes["clustering"]
    os.kill(clustering.pid, signal.SIGSTOP)
    try:
        r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": acct}})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

        def attribution_erased():   # the stage order: attribution, then clustering (hung)
            body = client.get(f"/v1/delete/{job_id}").json()
            return next(s for s in body["services"] if s["service"] == "attribution")["confirmed"]

        wait_for(attribution_erased, what="attribution's erase confirmed")
        privacy = dmesh.processes.pop("privacy")
        signalled = time.monotonic()
        privacy.send_signal(signal.SIGTERM)
        try:
            privacy.wait(60)
        except subprocess.TimeoutExpired:
            privacy.kill()
            privacy.wait()
        took = time.monotonic() - signalled
        assert took < 20, f"privacy took {took:.1f} s to exit after SIGTERM{dmesh.log_tail('privacy')}"
        # One pass of the job at a time, also while the peer hung longer than the lease
        # (5 s here; its heartbeat renews it, since session 21): until session 20 the
        # worker claimed the job again beside its own pass still waiting, and the hung
        # peer got the same Erase three times.
        cancelled = [line for line in (dmesh.log_dir / "privacy.log").read_text().splitlines()
                     if f"job {job_id}: erase in clustering failed" in line]
        assert len(cancelled) == 1, cancelled
    finally:
        os.kill(clustering.pid, signal.SIGCONT)
    dmesh.start_service("privacy")
    dmesh.wait_healthy(SLOW_MACHINE_S)
    body = poll(client, job_id)
    assert body["state"] == "completed", body
    assert remnants(dmesh, acct) == {}


def test_withdrawn_consent_is_refused_and_nothing_is_stored(dmesh, client):
    acct = f"e2e-consent-{RUN}"
    r = client.put(f"/v1/consent/{acct}", json={"processing": False, "attribution": False})
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    r = client.post("/v1/events", json={"events": [{
        "event_id": f"{acct}-0", "account_id": acct, "device_id": "tv-1", "device_type": "tv",
        "ts": _iso(time.time() - 3600), "kind": "heartbeat", "title_id": "t", "genres": [], "duration_s": 10}]})
    assert r.status_code == 412, r.text
    assert r.json()["error"]["field"] == "events[0].account_id", r.text
    assert count_rows(dmesh, acct) == 0


def test_export_returns_everything_ingested(dmesh, client):
    acct = f"e2e-export-{RUN}"
    post_events(client, acct, "tv-1", time.time() - 2 * DAY, 3)
    post_touchpoints(client, acct, [(f"{acct}-t1", "tv-1", time.time() - 2 * DAY, None)])
    r = client.get(f"/v1/household/{acct}/export")
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["schema"] == "hearth-household-export" and data["account_id"] == acct
    assert sorted(e["event_id"] for e in data["services"]["clustering"]["events"]) == \
        [f"{acct}-tv-1-{i}" for i in range(3)]
    assert data["services"]["clustering"]["events"][0]["title_id"] == "title-0"
    assert [t["campaign"] for t in data["services"]["attribution"]["touchpoints"]] == ["spring"]


BEFORE_SEALED_MODEL_VERSION = "ed5316b"   # session 28's end: the cached model's version in clear


def _household(client, acct: str) -> dict:
    r = client.get(f"/v1/household/{acct}")
    assert r.status_code == 200, r.text
    return r.json()


def _shows_tablet(household: dict) -> bool:
    return any("tablet" in p.get("devices", {}) for p in household.get("persons", []))


@pytest.mark.parametrize("dmesh", ["postgres"], indirect=True)   # the mesh with Redis
def test_a_cached_model_copied_before_a_device_erasure_and_written_back_is_not_served(dmesh, client, tmp_path):
    """attack28's "Left" (docs/security.md): a holder of the Redis URL copies a household's
    cached model, the household's tablet is erased (the unlearning refit stores the next
    version without it), and the copy is written back — as it was, or under a higher
    version in its clear header. Until session 29 clustering served it (version 3 with the
    tablet's person again while the database said 2). Now the version is sealed with the
    model and the database says which version is current: the stored one is answered.
    Then a rolling upgrade both ways: clustering of the release before meets this release's
    entry and answers from the database (no error), and this release takes the old
    release's entry for a miss."""
    import redis

    from bench.assign_cpu import extract
    from tests.helpers.history import require_commit
    from tests.helpers.mesh_calls import restart_service

    require_commit(BEFORE_SEALED_MODEL_VERSION)
    acct, t0 = f"e2e-cache-replay-{RUN}", time.time() - 14 * DAY
    events = [{"event_id": f"{acct}-{device}-{d}-{i}", "account_id": acct, "device_id": device,
               "device_type": device_type, "ts": _iso(t0 + d * DAY + hour * 3600 + i * 300), "kind": "heartbeat",
               "title_id": f"{genre}-{d}", "genres": [genre], "duration_s": 300, "maturity": maturity}
              for device, device_type, hour, genre, maturity in (("tab-kids", "tablet", 8, "animation", "kids"),
                                                                  ("tv-1", "tv", 21, "drama", "adult"))
              for d in range(12) for i in range(4)]
    assert client.post("/v1/events", json={"events": events}).json()["accepted"] == len(events)
    wait_for(lambda: _household(client, acct)["model_version"] >= 1, what="a first model", timeout_s=SLOW_MACHINE_S)
    raw = redis.Redis.from_url(dmesh.env_extra["HEARTH_REDIS_URL"])
    key = f"hearth:clustering:model:{acct}"
    before = _household(client, acct)
    assert _shows_tablet(before), before["persons"]
    copied = wait_for(lambda: raw.get(key), what="the cached model")
    assert struct.unpack_from("<q", copied)[0] == before["model_version"]

    job = delete(client, {"kind": "device", "account_id": acct, "device_id": "tab-kids"})
    assert job["state"] == "completed", job
    after = wait_for(lambda: (h := _household(client, acct))["model_version"] > before["model_version"] and h,
                     what="the unlearning refit", timeout_s=SLOW_MACHINE_S)
    assert not _shows_tablet(after), after["persons"]
    for replayed in (copied, struct.pack("<q", after["model_version"] + 1) + copied[8:]):
        raw.set(key, replayed)
        household = _household(client, acct)
        assert household["model_version"] == after["model_version"], (household["model_version"], after)
        assert not _shows_tablet(household), household["persons"]

    # Rolling upgrade: this release's entry in Redis, clustering of the release before.
    wait_for(lambda: raw.get(key), what="this release's entry cached")
    fence = dmesh.extra_env.pop("HEARTH_ERASURE_FENCE_S", None)   # a setting the release before refuses
    try:
        restart_service(dmesh, "clustering", extract(BEFORE_SEALED_MODEL_VERSION, tmp_path / "tree", own_protos=True))
    finally:
        if fence is not None:
            dmesh.extra_env["HEARTH_ERASURE_FENCE_S"] = fence
    try:
        new_format = raw.get(key)
        household = _household(client, acct)
        assert household["model_version"] == after["model_version"] and not _shows_tablet(household)
        old_format = wait_for(lambda: (got := raw.get(key)) != new_format and got, what="the old release's entry")
    finally:
        restart_service(dmesh, "clustering")
    household = _household(client, acct)
    assert household["model_version"] == after["model_version"] and not _shows_tablet(household)
    assert wait_for(lambda: (got := raw.get(key)) != old_format and got, what="this release's entry again")
    raw.close()


@pytest.mark.parametrize("dmesh", ["postgres"], indirect=True)   # the mesh with Redis
def test_another_replica_does_not_answer_with_the_erased_model_once_the_erasure_completed(dmesh, client):
    """keys29's "Left": a second clustering replica (its own gateway in front of it) holds
    the household's decoded model and confirmed its version from the database moments
    before. A device erasure, then a household erasure, run through the first replica;
    after each completes, a genuine Redis entry of the version the second replica holds is
    written back (what a holder of the Redis URL can do; a slow replica re-caching the
    version it had read does it too). Until session 30 the second replica answered with
    its held model for up to MODEL_CONFIRM_S (60 s) after its last confirmation: the
    erased tablet's person after the device erasure, and every person of the erased
    household after the household erasure. Now every erasure moves the store's erasure
    fence and completes only once each replica either saw it (and asks the database
    again) or has stopped trusting its notes (docs/security.md, session 30)."""
    import redis

    acct, t0 = f"e2e-replica-erased-{RUN}", time.time() - 14 * DAY
    replica_port = dmesh.spawn_on_free_ports("clustering-2", "services.clustering",
                                             {**dmesh.env(), **dmesh.process_env.get("clustering", {})},
                                             ("HEARTH_GRPC_PORT", "HEARTH_METRICS_PORT"))["HEARTH_GRPC_PORT"]
    gateway_port = dmesh.spawn_on_free_ports("gateway-2", "gateway",
                                             {**dmesh.env(), "HEARTH_CLUSTERING_ADDR": f"127.0.0.1:{replica_port}"},
                                             ("HEARTH_GATEWAY_PORT", "HEARTH_METRICS_PORT"))["HEARTH_GATEWAY_PORT"]
    raw = redis.Redis.from_url(dmesh.env_extra["HEARTH_REDIS_URL"])
    key = f"hearth:clustering:model:{acct}"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", headers={"X-API-Key": dmesh.api_key},
                          timeout=30) as other:
            wait_for(lambda: _serving(other), what="the second replica behind its gateway", timeout_s=SLOW_MACHINE_S)
            events = [{"event_id": f"{acct}-{device}-{d}-{i}", "account_id": acct, "device_id": device,
                       "device_type": device_type, "ts": _iso(t0 + d * DAY + hour * 3600 + i * 300),
                       "kind": "heartbeat", "title_id": f"{genre}-{d}", "genres": [genre], "duration_s": 300,
                       "maturity": maturity}
                      for device, device_type, hour, genre, maturity in (
                          ("tab-kids", "tablet", 8, "animation", "kids"), ("tv-1", "tv", 21, "drama", "adult"))
                      for d in range(12) for i in range(4)]
            assert client.post("/v1/events", json={"events": events}).json()["accepted"] == len(events)
            first = wait_for(lambda: (h := _household(client, acct))["model_version"] >= 1 and h,
                             what="a first model", timeout_s=SLOW_MACHINE_S)
            # The second replica decodes that version and confirms it with the database.
            held = wait_for(lambda: (h := _household(other, acct))["model_version"] == first["model_version"] and h,
                            what="the second replica to hold the model")
            assert _shows_tablet(held), held["persons"]
            vector = next(s["feature_vector"] for s in held["sessions"] if s["device_id"] == "tv-1")
            copied = wait_for(lambda: raw.get(key), what="the cached model")

            job = delete(client, {"kind": "device", "account_id": acct, "device_id": "tab-kids"})
            assert job["state"] == "completed", job
            raw.set(key, copied)
            answered = _household(other, acct)
            assert answered["model_version"] > held["model_version"], (answered["model_version"], held["model_version"])
            assert not _shows_tablet(answered), answered["persons"]

            # The second replica now holds the refitted version: the household is erased.
            copied = wait_for(lambda: (got := raw.get(key)) and struct.unpack_from("<q", got)[0]
                              == answered["model_version"] and got, what="the refitted model cached")
            job = delete(client, {"kind": "household", "account_id": acct})
            assert job["state"] == "completed", job
            raw.set(key, copied)
            # GET /v1/household answers 404 for an erased account before it reads a model;
            # an assignment reads the model.
            assigned = other.post("/v1/assign", json={"account_id": acct, "feature_vector": vector})
            assert assigned.status_code == 404, assigned.text
    finally:
        raw.delete(key)
        raw.close()
        dmesh.stop_process("gateway-2")
        dmesh.stop_process("clustering-2")


def _serving(http: httpx.Client) -> bool:
    try:
        return http.get("/health").json().get("status") == "SERVING"
    except (httpx.HTTPError, ValueError):
        return False
