"""Deletion across the mesh with the four real services in one process (SQLite files):
each scope removes exactly its rows (checked by reading the raw SQLite files), receipts
verify with the CLI and forgeries do not, jobs survive a service being down and the
privacy service restarting, retention goes through the same path, consent refusals
store nothing, the export holds everything ingested, and a copy of the store taken
before a household deletion cannot be decrypted afterwards (crypto-shredding)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from hearth.attribution.v1 import attribution_pb2 as apb
from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.common.v1 import common_pb2, common_pb2_grpc
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.privacy.v1 import privacy_pb2 as ppb
from services.common import identity
from services.common.errors import ERROR_FIELD_KEY
from services.common.field_crypto import TEXT_PREFIX
from services.common.pbutil import float_to_ts
from services.common.predictions import PredictionRecord
from services.privacy import cli
from services.testing import inprocess
from services.privacy.keys.domain import KeyDestroyedError, KeyRing, parse_kek_config
from services.privacy.keys.store import DataKeyStore
from services.common.storage.sql import SqliteDatabase
from tests.helpers.waiting import SLOW_MACHINE_S

DAY = 86400.0
SVC = identity.service_principal("ingest")
OFFICER = identity.Principal("olivia", identity.Role.PRIVACY_OFFICER)
DONE = (ppb.JOB_STATE_COMPLETED, ppb.JOB_STATE_FAILED)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    data = tmp_path_factory.mktemp("deletion-mesh")
    m = inprocess.start(data, privacy={"deletion_poll_s": 0.05, "deletion_retry_base_s": 0.05,
                                       "deletion_retry_max_s": 0.2, "deletion_lease_s": 2.0})
    m.data_dir = data
    yield m
    m.stop()


@pytest.fixture(scope="module")
def stubs(mesh):
    return {"clu": mesh.stub("clustering", SVC), "att": mesh.stub("attribution", SVC),
            "fee": mesh.stub("feedback", SVC), "pri": mesh.stub("privacy", OFFICER),
            "admin": mesh.stub("privacy"),
            "clu_data": mesh.stub("clustering", SVC, stub_cls=common_pb2_grpc.DataHolderStub),
            "privacy_data": mesh.stub("clustering", identity.service_principal("privacy"),
                                      stub_cls=common_pb2_grpc.DataHolderStub)}


# ---- data -----------------------------------------------------------------------------

def events(account: str, device: str, start: float, n: int, prefix: str = "", **extra) -> list[cpb.ViewingEvent]:
    out = []
    for i in range(n):
        e = cpb.ViewingEvent(event_id=f"{prefix or account}-{device}-{i}", account_id=account, device_id=device,
                             device_type=cpb.DEVICE_TYPE_TV, ts=float_to_ts(start + i * 300),
                             kind=cpb.EVENT_KIND_HEARTBEAT, title_id=f"title-{device}-{i}", genres=["drama", "crime"],
                             duration_s=300, maturity=cpb.MATURITY_ADULT, series_id="show-1", country="FR",
                             profile_hint=f"hint-{device}", **extra)
        out.append(e)
    return out


def ingest(stubs, evs) -> cpb.IngestEventsResponse:
    return stubs["clu"].IngestEvents(iter([cpb.IngestEventsRequest(events=evs)]))


def touchpoints(stubs, account: str, items: list[tuple[str, str, float, str | None]]):
    return stubs["att"].RecordTouchpoints(apb.RecordTouchpointsRequest(touchpoints=[
        apb.Touchpoint(touchpoint_id=tid, account_id=account, device_id=device, ts=float_to_ts(ts),
                       channel="email", campaign=f"camp-{tid}", person_id=person or "")
        for tid, device, ts, person in items]))


def predictions(stubs, account: str, items: list[tuple[str, str, float]]):
    return stubs["fee"].RecordPrediction(fpb.RecordPredictionRequest(predictions=[
        fpb.Prediction(prediction_id=pid, account_id=account, session_id=f"s-{pid}", person_id=person,
                       probabilities={person: 0.9, "p9": 0.1}, model_variant="kmeans", model_version=1,
                       ts=float_to_ts(ts), household_size=2) for pid, person, ts in items]))


def delete(stubs, scope: common_pb2.ErasureScope, request_id: str = "", timeout_s: float = SLOW_MACHINE_S):
    job = stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(scope=scope, request_id=request_id,
                                                                  reason="gdpr_art17"))
    return job.job_id, wait_job(stubs, job.job_id, timeout_s)


def wait_job(stubs, job_id: str, timeout_s: float = SLOW_MACHINE_S) -> ppb.GetDeletionResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        r = stubs["pri"].GetDeletion(ppb.GetDeletionRequest(job_id=job_id))
        if r.state in DONE or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def rows(mesh, service: str, sql: str, params=()) -> list[tuple]:
    """Read a service's raw SQLite file (not through the service)."""
    conn = sqlite3.connect(Path(mesh.data_dir) / f"{service}.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def counts(r: ppb.GetDeletionResponse) -> dict[str, dict[str, int]]:
    return {s.service: dict(s.result.deleted_counts) for s in r.services}


def verify_cli(mesh, receipt_json: str, tmp_path: Path) -> int:
    path = tmp_path / "receipt.json"
    path.write_text(receipt_json)
    return cli.main(["verify-receipt", str(path), "--public-key",
                     str(Path(mesh.data_dir) / "privacy-receipt-signing.pub")])


# ---- scopes -----------------------------------------------------------------------------

def test_device_scope_erases_that_device_everywhere_and_receipt_verifies(mesh, stubs, tmp_path):
    acct, t0 = "dev-acct", time.time() - 3 * DAY
    ingest(stubs, events(acct, "tv-1", t0, 6) + events(acct, "ph-1", t0 + DAY, 4))
    touchpoints(stubs, acct, [("dev-t1", "tv-1", t0, None), ("dev-t2", "ph-1", t0 + DAY, None)])
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, device_id="tv-1"))
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    c = counts(job)
    assert c["clustering"] == {"events": 6, "sessions": 1, "devices": 1}
    assert c["attribution"] == {"touchpoints": 1}
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM events WHERE account_id = ? AND device_id = 'tv-1'",
                (acct,)) == [(0,)]
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM sessions WHERE account_id = ? AND device_id = 'tv-1'",
                (acct,)) == [(0,)]
    assert rows(mesh, "clustering", "SELECT device_id FROM devices WHERE account_id = ?", (acct,)) == [("ph-1",)]
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM events WHERE account_id = ?", (acct,)) == [(4,)]
    assert rows(mesh, "attribution", "SELECT touchpoint_id FROM touchpoints WHERE account_id = ?",
                (acct,)) == [("dev-t2",)]
    receipt = json.loads(job.receipt_json)["receipt"]
    assert receipt["scope"] == {"kind": "device", "account_id": acct, "device_id": "tv-1"}
    assert receipt["total_count"] == 9 and receipt["requested_by"] == {"principal": "olivia",
                                                                       "role": "privacy_officer"}
    assert verify_cli(mesh, job.receipt_json, tmp_path) == 0
    # The privacy service's own step is in the receipt too: its cached copies of the
    # device's household (none outside a household deletion's key) are gone.
    assert [(p["store"], p["where"]) for p in receipt["services"]["privacy"]["purges"]] == [
        ("memory", f"hearth:privacy:{acct}:*")]


def test_forged_receipt_is_rejected_by_cli_and_service(mesh, stubs, tmp_path):
    acct = "forge-acct"
    ingest(stubs, events(acct, "tv-1", time.time() - DAY, 3))
    mesh.servicers["clustering"].app.drain()   # the household model is built in the background
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, household=True))
    signed = json.loads(job.receipt_json)
    # A well-formed receipt that under-reports what was deleted (6 records: 3 events,
    # 1 session, 1 device, 1 household model), with a consistent total: only the
    # signature can tell.
    assert signed["receipt"]["services"]["clustering"]["count"] == 6
    signed["receipt"]["services"]["clustering"]["count"] = 1
    signed["receipt"]["total_count"] = sum(s["count"] for s in signed["receipt"]["services"].values())
    forged = json.dumps(signed)
    assert verify_cli(mesh, forged, tmp_path) == 1
    assert stubs["pri"].VerifyReceipt(ppb.VerifyReceiptRequest(receipt_json=forged)).valid is False
    assert stubs["pri"].VerifyReceipt(ppb.VerifyReceiptRequest(receipt_json=job.receipt_json)).valid is True


def test_person_scope_erases_that_persons_sessions_touchpoints_and_predictions(mesh, stubs):
    acct, t0 = "person-acct", time.time() - 4 * DAY
    ingest(stubs, events(acct, "tv-1", t0, 3) + events(acct, "tv-1", t0 + DAY, 3, prefix="b"))
    mesh.servicers["clustering"].app.drain()   # let the background model settle first
    store = mesh.servicers["clustering"].app.store
    sessions = sorted(store.closed_sessions(acct), key=lambda s: s.start_ts)
    store.set_persons(acct, {sessions[0].session_id: "p1", sessions[1].session_id: "p2"})
    touchpoints(stubs, acct, [("per-t1", "tv-1", t0, "p1"), ("per-t2", "tv-1", t0 + DAY, "p2")])
    predictions(stubs, acct, [("per-q1", "p1", t0), ("per-q2", "p2", t0 + DAY)])
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, person_id="p1"))
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    assert rows(mesh, "clustering", "SELECT person_id FROM sessions WHERE account_id = ?", (acct,)) == [("p2",)]
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM events WHERE account_id = ?", (acct,)) == [(3,)]
    assert rows(mesh, "attribution", "SELECT touchpoint_id FROM touchpoints WHERE account_id = ?",
                (acct,)) == [("per-t2",)]
    assert rows(mesh, "feedback", "SELECT prediction_id FROM predictions WHERE account_id = ?",
                (acct,)) == [("per-q2",)]


def test_window_scope_erases_only_inside_the_window(mesh, stubs):
    acct, t0 = "win-acct", time.time() - 10 * DAY
    ingest(stubs, events(acct, "tv-1", t0, 4) + events(acct, "tv-1", t0 + 5 * DAY, 4, prefix="late"))
    touchpoints(stubs, acct, [("win-t1", "tv-1", t0 + 60, None), ("win-t2", "tv-1", t0 + 5 * DAY, None)])
    window = common_pb2.TimeRange(start=float_to_ts(t0 - 1), end=float_to_ts(t0 + DAY))
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, window=window))
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    left = rows(mesh, "clustering", "SELECT event_id FROM events WHERE account_id = ? ORDER BY ts", (acct,))
    assert [r[0] for r in left] == [f"late-tv-1-{i}" for i in range(4)]
    assert rows(mesh, "attribution", "SELECT touchpoint_id FROM touchpoints WHERE account_id = ?",
                (acct,)) == [("win-t2",)]


def test_household_scope_leaves_no_remnant_and_shreds_the_key_of_old_copies(mesh, stubs, tmp_path):
    acct, other, t0 = "hh-acct", "hh-other", time.time() - 2 * DAY
    ingest(stubs, events(acct, "tv-1", t0, 5) + events(other, "tv-1", t0, 2))
    touchpoints(stubs, acct, [("hh-t1", "tv-1", t0, None)])
    predictions(stubs, acct, [("hh-q1", "p1", t0)])
    backup = tmp_path / "clustering-backup.db"
    with sqlite3.connect(Path(mesh.data_dir) / "clustering.db") as src, sqlite3.connect(backup) as dst:
        src.backup(dst)  # a consistent copy, as a backup tool would take it
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, household=True))
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    assert counts(job)["privacy"] == {"data_keys": 1, "digest_keys": 1}
    # What the privacy service purged itself is signed into the receipt, where and when:
    # its cached copies, then the destroyed key, overwritten and checkpointed out of the WAL.
    receipt = json.loads(job.receipt_json)["receipt"]
    own = receipt["services"]["privacy"]["purges"]
    assert [p["store"] for p in own] == ["memory", "sqlite"] and all(p["complete"] for p in own), own
    assert own[0]["where"] == f"hearth:privacy:{acct}:*"
    assert own[1]["where"].endswith("privacy.db") and "tombstone" in own[1]["action"], own[1]
    assert "wal_checkpoint(TRUNCATE)" in own[1]["action"]
    assert all(receipt["requested_at"] <= p["at"] <= receipt["completed_at"] for p in own), own
    assert verify_cli(mesh, job.receipt_json, tmp_path) == 0
    for service, table in [("clustering", "events"), ("clustering", "sessions"), ("clustering", "devices"),
                           ("attribution", "touchpoints"), ("feedback", "predictions")]:
        assert rows(mesh, service, f"SELECT COUNT(*) FROM {table} WHERE account_id = ?", (acct,)) == [(0,)], table

    # The backup still holds the ciphertexts, but no key can open them any more.
    conn = sqlite3.connect(backup)
    stolen = conn.execute("SELECT title_id FROM events WHERE account_id = ?", (acct,)).fetchall()
    control = conn.execute("SELECT title_id FROM events WHERE account_id = ?", (other,)).fetchone()[0]
    conn.close()
    assert len(stolen) == 5 and all(v.startswith(TEXT_PREFIX) for (v,) in stolen)
    keks = parse_kek_config((Path(mesh.data_dir) / "privacy-keks").read_text())
    db = SqliteDatabase(Path(mesh.data_dir) / "privacy.db")
    ring = KeyRing(keks, keks[0].kek_id, DataKeyStore(db).load())
    db.close()
    import base64
    for (value,) in stolen:
        with pytest.raises(KeyDestroyedError):
            ring.decrypt_field(acct, "title_id", base64.b64decode(value[len(TEXT_PREFIX):]))
    assert ring.decrypt_field(other, "title_id", base64.b64decode(control[len(TEXT_PREFIX):])) == b"title-tv-1-0"
    # No key material is left for the household in the key table either.
    assert rows(mesh, "privacy", "SELECT length(wrapped), destroyed_at IS NOT NULL FROM data_keys "
                "WHERE account_id = ?", (acct,)) == [(0, 1)]
    # And the account cannot come back under the destroyed key.
    with pytest.raises(grpc.RpcError) as err:
        ingest(stubs, events(acct, "tv-1", time.time() - 3600, 1, prefix="again"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_events_sent_while_the_household_is_erased_are_refused_or_erased_with_it(mesh, stubs, monkeypatch):
    """A device keeps sending while its household's deletion runs: here an event lands
    right after each service's Erase returns. Whatever lands must be refused or erased
    with the rest, and the household must refuse data once the job is done. Until
    session 14 the key was shredded last: an event landing after clustering's Erase
    fetched the still-live key, was stored, and the store kept that key cached for up to
    a minute, so the household took events for that long after its job completed (seen
    through the gateway: 404 events accepted in the 8 s after completion, their device id
    left in clustering.db)."""
    acct, t0 = "hh-streaming", time.time() - 2 * DAY
    ingest(stubs, events(acct, "tv-1", t0, 5))
    peers = mesh.servicers["privacy"].deletion.peers
    erase, landed = peers.erase, []

    def erase_then_a_late_event(service, scope, job_id):
        result = erase(service, scope, job_id)
        try:
            ingest(stubs, events(acct, f"tv-late-{service}", time.time() - 600, 2))
            landed.append((service, "stored"))
        except grpc.RpcError as exc:
            landed.append((service, exc.code()))
        return result

    monkeypatch.setattr(peers, "erase", erase_then_a_late_event)
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, household=True))
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    assert {service for service, _ in landed} == {"attribution", "feedback", "clustering"}
    assert [s.service for s in job.services] == ["privacy", "attribution", "clustering", "feedback"]  # erase order
    # the last store to erase took nothing more: the key was already gone
    assert dict(landed)["clustering"] == grpc.StatusCode.FAILED_PRECONDITION, landed
    for table in ("events", "sessions", "devices"):
        assert rows(mesh, "clustering", f"SELECT COUNT(*) FROM {table} WHERE account_id = ?", (acct,)) == [(0,)], \
            (table, landed)
    with pytest.raises(grpc.RpcError) as err:
        ingest(stubs, events(acct, "tv-1", time.time() - 300, 1, prefix="after"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Nor do the household's conversions come back: they carry no encrypted column, so
    # until session 14 attribution stored them under the erased account id.
    with pytest.raises(grpc.RpcError) as err:
        stubs["att"].RecordConversions(apb.RecordConversionsRequest(conversions=[
            apb.Conversion(conversion_id="after-c1", account_id=acct, ts=float_to_ts(time.time() - 60),
                           kind="purchase", value=9.0, device_id="tv-1")]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The batch's item (attack29: the field was "account_id", naming none of a batch's items).
    assert dict(err.value.trailing_metadata() or ()).get(ERROR_FIELD_KEY) == "conversions[0].account_id"
    assert rows(mesh, "attribution", "SELECT COUNT(*) FROM conversions WHERE account_id = ?", (acct,)) == [(0,)]


def test_predictions_clustering_still_had_to_forward_do_not_outlive_the_erasure(mesh, stubs, monkeypatch):
    """Clustering forwards each answered prediction to feedback from a durable outbox. Here
    feedback was unreachable when the household's prediction was answered and comes back
    during the deletion: the forwarder delivers its backlog as soon as feedback answers
    (right after feedback's Erase). Until session 19 feedback erased before clustering, so
    that backlog reached feedback after its erase and stayed there after the job
    completed; now clustering's erase takes the outbox first."""
    acct, other = "hh-backlog", "hh-backlog-neighbour"
    log = mesh.servicers["clustering"].app.predictions
    send, feedback_back = log._send, []

    def send_once_feedback_is_back(request):
        if not feedback_back:
            raise ConnectionError("feedback unreachable")
        return send(request)

    monkeypatch.setattr(log, "_send", send_once_feedback_is_back)
    now = time.time()
    log.record([PredictionRecord(prediction_id=f"{a}-q1", account_id=a, session_id=f"{a}-s1", person_id="p1",
                                 probabilities={"p1": 0.8, "p2": 0.2}, model_variant="gmm", model_version=1,
                                 ts=now - 60, cold_start=False, household_size=2) for a in (acct, other)])
    waiting = rows(mesh, "clustering", "SELECT accounts FROM prediction_chunks")
    assert any(acct in accounts for (accounts,) in waiting), waiting   # held: feedback is unreachable
    peers = mesh.servicers["privacy"].deletion.peers
    erase = peers.erase

    def erase_then_drain_the_backlog(service, scope, job_id):
        result = erase(service, scope, job_id)
        if service == "feedback":
            feedback_back.append(True)
        try:
            while log.forward_once():
                pass
        except ConnectionError:
            pass
        return result

    monkeypatch.setattr(peers, "erase", erase_then_drain_the_backlog)
    _, job = delete(stubs, common_pb2.ErasureScope(account_id=acct, household=True))
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    assert feedback_back   # the backlog was drained during the job
    assert rows(mesh, "feedback", "SELECT COUNT(*) FROM predictions WHERE account_id = ?", (acct,)) == [(0,)]
    # the neighbour's prediction was delivered, not lost with the household's
    assert rows(mesh, "feedback", "SELECT prediction_id FROM predictions WHERE account_id = ?",
                (other,)) == [(f"{other}-q1",)]


def test_plaintext_is_not_in_the_raw_stores(mesh, stubs):
    acct = "enc-acct"
    # The UTC offset (session 23) reveals rough location: sealed like country.
    ingest(stubs, events(acct, "tv-1", time.time() - DAY, 2, utc_offset_minutes=-300))
    touchpoints(stubs, acct, [("enc-t1", "tv-1", time.time() - DAY, None)])
    raw = rows(mesh, "clustering", "SELECT title_id, series_id, genres, country, profile_hint, utc_offset_minutes "
               "FROM events WHERE account_id = ?", (acct,))
    assert raw and all(v.startswith(TEXT_PREFIX) for r in raw for v in r)
    labels = rows(mesh, "clustering", "SELECT features FROM sessions WHERE account_id = ?", (acct,))
    assert all(len(f) % 4 == 1 for (f,) in labels)  # sealed float32 vectors (4k + 33 bytes)
    assert rows(mesh, "attribution", "SELECT campaign FROM touchpoints WHERE account_id = ?",
                (acct,))[0][0].startswith(TEXT_PREFIX)


# ---- durability ---------------------------------------------------------------------------

def test_job_survives_a_service_down_and_the_privacy_service_restarting(mesh, stubs):
    acct = "restart-acct"
    ingest(stubs, events(acct, "tv-1", time.time() - DAY, 4))
    mesh.stop_service("clustering")
    try:
        job = stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(
            scope=common_pb2.ErasureScope(account_id=acct, household=True), request_id="restart-1"))
        # Attribution confirms; clustering keeps failing, and feedback (the stage after
        # clustering's, which forwards to it) waits. Waited for whole, on the machine's time.
        deadline = time.monotonic() + SLOW_MACHINE_S
        while True:
            r = stubs["pri"].GetDeletion(ppb.GetDeletionRequest(job_id=job.job_id))
            by = {s.service: s for s in r.services}
            if (by["clustering"].attempts >= 1 and by["attribution"].confirmed) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert r.state == ppb.JOB_STATE_RUNNING
        assert by["attribution"].confirmed and not by["clustering"].confirmed
        assert not by["feedback"].confirmed and by["feedback"].attempts == 0
        assert "UNAVAILABLE" in by["clustering"].last_error
        mesh.stop_service("privacy")      # the coordinator dies with the job unfinished
        mesh.start_service("privacy")     # ... and a fresh one resumes it from the table
    finally:
        mesh.start_service("clustering")
    done = wait_job(stubs, job.job_id)
    assert done.state == ppb.JOB_STATE_COMPLETED, done
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM events WHERE account_id = ?", (acct,)) == [(0,)]
    again = stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(
        scope=common_pb2.ErasureScope(account_id=acct, household=True), request_id="restart-1"))
    assert again.job_id == job.job_id  # idempotent by request_id


def test_request_id_reused_for_another_scope_is_refused(stubs):
    stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(
        scope=common_pb2.ErasureScope(account_id="reuse-acct", device_id="a"), request_id="reuse-1"))
    with pytest.raises(grpc.RpcError) as err:
        stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(
            scope=common_pb2.ErasureScope(account_id="reuse-acct", device_id="b"), request_id="reuse-1"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_deletion_reason_with_a_control_character_is_refused_naming_it(stubs):
    """The gateway refuses control characters in `reason`; gRPC callers (the Envoy edge)
    reached the store: on PostgreSQL a NUL made RequestDeletion INTERNAL, on SQLite it was
    stored into the job and its audit record (attack29). Now refused, as at the gateway."""
    for reason in ("gdpr\x00", "gdpr\nart17"):
        with pytest.raises(grpc.RpcError) as err:
            stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(
                scope=common_pb2.ErasureScope(account_id="reason-acct", household=True), reason=reason))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
        assert dict(err.value.trailing_metadata() or ()).get(ERROR_FIELD_KEY) == "reason"


def test_a_job_id_with_a_control_character_is_refused_naming_it(stubs):
    """GetDeletion and GetDataKeyRotations over gRPC (the Envoy edge; the gateway's path
    pattern refuses it): a NUL in `job_id` was INTERNAL on PostgreSQL, which cannot compare
    text holding one, and NOT_FOUND on SQLite (attack29)."""
    for call in (lambda: stubs["pri"].GetDeletion(ppb.GetDeletionRequest(job_id="job-\x00")),
                 lambda: stubs["pri"].GetDataKeyRotations(ppb.GetDataKeyRotationsRequest(job_id="rot-\x00"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert dict(err.value.trailing_metadata() or ()).get(ERROR_FIELD_KEY) == "job_id"


def test_every_account_window_is_only_for_the_privacy_service(mesh, stubs):
    window = common_pb2.TimeRange(end=float_to_ts(time.time() - 100 * DAY))
    with pytest.raises(grpc.RpcError) as err:
        stubs["pri"].RequestDeletion(ppb.RequestDeletionRequest(
            scope=common_pb2.ErasureScope(account_id="*", window=window)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nor may any other service principal call Erase across accounts directly.
    with pytest.raises(grpc.RpcError) as err:
        stubs["clu_data"].Erase(common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="*", window=window)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Not even a single household's (Erase is svc:privacy's only, session 18) ...
    with pytest.raises(grpc.RpcError) as err:
        stubs["clu_data"].Erase(common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="acc-x", household=True)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # ... and the privacy service's own "every account" Erase takes windows only.
    with pytest.raises(grpc.RpcError) as err:
        stubs["privacy_data"].Erase(common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="*", household=True)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_retention_purge_removes_only_data_older_than_the_retention(mesh, stubs):
    now = time.time()
    old, recent = now - 120 * DAY, now - 10 * DAY
    for acct in ("ret-a", "ret-b"):
        ingest(stubs, events(acct, "tv-1", old, 3, prefix=f"{acct}-old") +
               events(acct, "tv-1", recent, 2, prefix=f"{acct}-new"))
        touchpoints(stubs, acct, [(f"{acct}-t-old", "tv-1", old, None), (f"{acct}-t-new", "tv-1", recent, None)])
        predictions(stubs, acct, [(f"{acct}-q-old", "p1", old), (f"{acct}-q-new", "p1", recent)])
    coordinator = mesh.servicers["privacy"].deletion
    coordinator.retention_check_s, coordinator.retention_days = 3600.0, 90.0
    coordinator._retention_period = None
    stored = coordinator.maybe_request_retention(now + 7200)  # a period nobody purged yet
    assert stored.job.scope.account_id == "*" and stored.reason == "retention"
    job = wait_job(stubs, stored.job.job_id)
    coordinator.retention_check_s = 0.0
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    for acct in ("ret-a", "ret-b"):
        left = rows(mesh, "clustering", "SELECT event_id FROM events WHERE account_id = ?", (acct,))
        assert sorted(r[0] for r in left) == [f"{acct}-new-tv-1-{i}" for i in range(2)]
        assert rows(mesh, "attribution", "SELECT touchpoint_id FROM touchpoints WHERE account_id = ?",
                    (acct,)) == [(f"{acct}-t-new",)]
        assert rows(mesh, "feedback", "SELECT prediction_id FROM predictions WHERE account_id = ?",
                    (acct,)) == [(f"{acct}-q-new",)]
    assert json.loads(job.receipt_json)["receipt"]["account_id"] == "*"


# ---- consent, export, keys ------------------------------------------------------------------

def test_withdrawn_consent_refuses_ingest_and_touchpoints_and_stores_nothing(mesh, stubs):
    acct = "noconsent-acct"
    stubs["pri"].SetConsent(ppb.SetConsentRequest(account_id=acct, processing=False, attribution=False))
    for call, field in ((lambda: ingest(stubs, events(acct, "tv-1", time.time() - DAY, 2)), "events[0].account_id"),
                        (lambda: touchpoints(stubs, acct, [("nc-t1", "tv-1", time.time() - DAY, None)]),
                         "touchpoints[0].account_id")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dict(err.value.trailing_metadata())[ERROR_FIELD_KEY] == field   # the batch's item (attack29)
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM events WHERE account_id = ?", (acct,)) == [(0,)]
    assert rows(mesh, "attribution", "SELECT COUNT(*) FROM touchpoints WHERE account_id = ?", (acct,)) == [(0,)]
    # attribution needs its own flag: processing alone is not enough for touchpoints
    acct2 = "noattr-acct"
    stubs["pri"].SetConsent(ppb.SetConsentRequest(account_id=acct2, processing=True, attribution=False))
    ingest(stubs, events(acct2, "tv-1", time.time() - DAY, 1))
    with pytest.raises(grpc.RpcError) as err:
        touchpoints(stubs, acct2, [("na-t1", "tv-1", time.time() - DAY, None)])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_withdrawn_consent_refuses_feedback_labels_and_refits(mesh, stubs):
    # Labels (who watched a session, from feedback) were stored and refit the household
    # model, and Refit ran, whatever the account's consent: both are processing.
    acct = "nolabels-acct"
    stubs["pri"].SetConsent(ppb.SetConsentRequest(account_id=acct, processing=False, attribution=True))
    for call in (lambda: stubs["clu"].RecordLabels(cpb.RecordLabelsRequest(labels=[cpb.SessionLabel(
                     account_id=acct, session_id="s-1", person_id="p1", source="feedback")])),
                 lambda: stubs["clu"].Refit(cpb.RefitRequest(account_id=acct, reason="test"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert dict(err.value.trailing_metadata())[ERROR_FIELD_KEY] == "account_id"
    assert rows(mesh, "clustering", "SELECT COUNT(*) FROM session_labels WHERE account_id = ?", (acct,)) == [(0,)]


def test_export_contains_everything_ingested(mesh, stubs):
    acct, t0 = "export-acct", time.time() - 2 * DAY
    evs = events(acct, "tv-1", t0, 4) + events(acct, "ph-1", t0 + 3600 * 5, 3)
    ingest(stubs, evs)
    touchpoints(stubs, acct, [("ex-t1", "tv-1", t0, None), ("ex-t2", "ph-1", t0, "p2")])
    stubs["att"].RecordConversions(apb.RecordConversionsRequest(conversions=[
        apb.Conversion(conversion_id="ex-c1", account_id=acct, ts=float_to_ts(t0 + 60), kind="subscribe", value=9.99)]))
    predictions(stubs, acct, [("ex-q1", "p1", t0)])
    stubs["fee"].RecordFeedback(fpb.RecordFeedbackRequest(feedback_id="ex-f1", prediction_id="ex-q1",
                                                          kind=fpb.FEEDBACK_KIND_EXPLICIT_CONFIRM,
                                                          ts=float_to_ts(t0 + 120)))
    stubs["pri"].SetConsent(ppb.SetConsentRequest(account_id=acct, processing=True, attribution=True))
    data = json.loads(stubs["pri"].ExportHousehold(ppb.ExportHouseholdRequest(account_id=acct)).export_json)
    assert data["schema"] == "hearth-household-export" and data["v"] == 1 and data["account_id"] == acct
    clustering = data["services"]["clustering"]
    by_id = {e["event_id"]: e for e in clustering["events"]}
    assert set(by_id) == {e.event_id for e in evs}
    for e in evs:
        got = by_id[e.event_id]
        assert (got["title_id"], got["series_id"], got["genres"], got["country"], got["profile_hint"]) == \
            (e.title_id, e.series_id, list(e.genres), e.country, e.profile_hint)
    assert {d["device_id"] for d in clustering["devices"]} == {"tv-1", "ph-1"}
    assert sum(s["event_count"] for s in clustering["sessions"]) == len(evs)
    assert all(len(s["features"]) == 35 for s in clustering["sessions"])
    attribution = data["services"]["attribution"]
    assert {(t["touchpoint_id"], t["campaign"]) for t in attribution["touchpoints"]} == \
        {("ex-t1", "camp-ex-t1"), ("ex-t2", "camp-ex-t2")}
    assert [c["conversion_id"] for c in attribution["conversions"]] == ["ex-c1"]
    feedback = data["services"]["feedback"]
    assert [p["prediction_id"] for p in feedback["predictions"]] == ["ex-q1"]
    assert [f["feedback_id"] for f in feedback["feedback"]] == ["ex-f1"]
    privacy = data["services"]["privacy"]
    assert privacy["consent"]["explicit"] is True
    assert [k["dek_version"] for k in privacy["data_keys"]] == [1]
    assert "wrapped" not in json.dumps(privacy["data_keys"])


def test_data_keys_only_for_service_principals(stubs):
    with pytest.raises(grpc.RpcError) as err:
        stubs["admin"].GetDataKey(ppb.GetDataKeyRequest(account_id="any-acct"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        stubs["pri"].GetDataKey(ppb.GetDataKeyRequest(account_id="any-acct"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
