"""Zero remnants, shown by raw bytes: after a deletion job reports completed, no byte of
the deleted data is readable in any file of any store while the mesh keeps running as
real processes: the SQLite main files and their -wal/-shm files, the services' log files
and the trace (span) file; on PostgreSQL + Redis, every file of the PostgreSQL data
directory (heap, TOAST, indexes, catalogs incl. ``pg_statistic``, ``pg_wal``), every Redis
key and its value, and every file of the Redis directory as Redis left it: that Redis
persists as a stock redis.conf makes it (a save point) and with an append-only file, and
the scan forces no save (until session 18 it ran ``SAVE`` first, which hid that the last
snapshot and the AOF still held the erased household's cached model).

Every value sent for the data to be deleted carries a marker (``zr<tag>``: event ids,
titles, profile hints, touchpoint ids, campaigns); device ids carry ``dv<tag>``. A
control household that is not deleted carries its own markers, and the same scan must
find them: it proves the scan sees the stores at all. The privacy service's files keep
the account and device ids that a deletion receipt and the audit log name (the proof of
deletion, docs/privacy.md), so only ``zr`` markers are checked there.

On PostgreSQL the data services (clustering, attribution, feedback) share one cluster,
run as in production for erasure (full-page writes on, ``wal_recycle = off``,
docs/privacy.md §11); the privacy service, which keeps the ids its receipts and audit
log name by design, has its own cluster, so every file of the data cluster, WAL
included, must be free of the deleted ids too. Relation files are named by the table
they hold (``clustering.pg:events``) through ``pg_class``, so a hit says where it is.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from services.testing.mesh import running_mesh
from tests.helpers.servers import PURGEABLE_WAL, data_dir_files, fresh_database, relation_names, running_postgres, running_redis
from tests.helpers.waiting import SLOW_MACHINE_S, deletion_job
from tests.helpers.timestamps import iso_utc as _iso

DAY = 86400.0
RUN = uuid.uuid4().hex[:6]
DATA_SERVICES = ("clustering", "attribution", "feedback")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def rmesh(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"remnants-{request.param}")
    spans = base / "spans.jsonl"
    env = {"HEARTH_DELETION_POLL_S": "0.1", "HEARTH_DELETION_RETRY_BASE_S": "0.1",
           "HEARTH_DELETION_RETRY_MAX_S": "0.5", "HEARTH_RETENTION_CHECK_S": "0",
           "HEARTH_ERASURE_FENCE_S": "0.5",   # each Erase waits it out (3 s in production)
           "HEARTH_TRACE_EXPORT": f"jsonl:{spans}",
           # Data key rotation: the settle covers other replicas' key caches; one replica of
           # each service here, whose caches the stores' Rekey drops (70 s in production).
           "HEARTH_DEK_ROTATION_SETTLE_S": "3"}
    if request.param == "sqlite":
        yield from _running_mesh(base, env, backend="sqlite")
        return
    (base / "redis").mkdir()
    with running_postgres(**PURGEABLE_WAL) as pg, \
            running_redis(base / "redis", appendonly="yes", save="3600 1") as rd:
        env.update(HEARTH_STORAGE="postgres", HEARTH_POSTGRES_DSN=pg.dsn, HEARTH_REDIS_URL=rd.url)
        privacy = {"HEARTH_POSTGRES_DSN": fresh_database(request.getfixturevalue("postgres_dsn"))}
        yield from _running_mesh(base, env, backend="postgres", pg=pg, redis_dir=rd.dir,
                                 process_env={"privacy": privacy})


def _running_mesh(base: Path, env: dict, *, backend: str, pg=None, redis_dir=None, process_env=None):
    with running_mesh(base, {"olivia": "admin"}, timeout_s=120, extra_env=env,
                      process_env=process_env or {}) as m:
        m.backend, m.env_extra, m.spans_path, m.pg, m.redis_dir = backend, env, base / "spans.jsonl", pg, redis_dir
        m.privacy_dsn = (process_env or {}).get("privacy", {}).get("HEARTH_POSTGRES_DSN")
        yield m


@pytest.fixture(scope="module")
def client(rmesh):
    with httpx.Client(base_url=rmesh.url, headers={"X-API-Key": rmesh.api_key}, timeout=60) as c:
        yield c


def post_sessions(client, account: str, device: str, tag: str, start: float, n: int, *, kids: bool = False,
                  every_s: float = 3 * 3600) -> None:
    """``n`` one-event sessions (``every_s`` apart) whose every free value carries ``zr<tag>``."""
    body = {"events": [{
        "event_id": f"zr{tag}-e{i}", "account_id": account, "device_id": device,
        "device_type": "tablet" if kids else "tv", "ts": _iso(start + i * every_s), "kind": "play_start",
        "title_id": f"zr{tag}-title", "series_id": f"zr{tag}-series", "genres": ["kids" if kids else "drama"],
        "duration_s": 1200 if kids else 3600, "maturity": "kids" if kids else "adult", "country": "FR",
        "profile_hint": f"zr{tag}-hint"} for i in range(n)]}
    r = client.post("/v1/events", json=body)
    assert r.status_code == 200, r.text
    touch = {"touchpoints": [{"touchpoint_id": f"zr{tag}-t{i}", "account_id": account, "device_id": device,
                              "ts": _iso(start + i * every_s), "channel": "email",
                              "campaign": f"zr{tag}-campaign"} for i in range(2)]}
    r = client.post("/v1/touchpoints", json=touch)
    assert r.status_code == 200, r.text


def household(client, account: str) -> dict:
    r = client.get(f"/v1/household/{account}")
    assert r.status_code == 200, r.text
    return r.json()


def assign_all(client, account: str) -> dict:
    """Assign every stored session (so the feedback service holds predictions about
    them); returns the household as it is then."""
    h = household(client, account)
    for s in h["sessions"]:
        r = client.post("/v1/assign", json={"account_id": account, "session_id": s["session_id"]})
        assert r.status_code == 200, r.text
    return h


def delete(client, scope: dict, timeout_s: float = 90.0) -> dict:
    r = client.post("/v1/delete", json={"scope": scope, "reason": "gdpr_art17"})
    assert r.status_code == 202, r.text
    body = deletion_job(client, r.json()["job_id"], timeout_s)
    assert body["state"] == "completed", body
    return body


def wait_delivered(rmesh, client, account: str, n: int, timeout_s: float = 30.0) -> None:
    """Predictions go to the feedback service through an outbox: wait until they are
    there (so that the scan also covers the feedback store)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get(f"/v1/household/{account}/export")
        if r.status_code == 200 and len(r.json()["services"]["feedback"]["predictions"]) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{n} predictions of {account} never reached the feedback service")


# ---- the raw-byte scan ---------------------------------------------------------------------

_RELATION_FILE = re.compile(r"^(base/\d+/\d+)(?:_\w+)?(?:\.\d+)?$")


def postgres_sources(rmesh) -> dict[str, bytes]:
    """Every file of the data services' PostgreSQL data directory: a relation file is
    named ``<service>.pg:<table>`` (its schema ``hearth_<service>``), anything else
    (``pg_wal``, catalogs, ``global``) ``pg:<path>``."""
    names = relation_names(rmesh.pg.dsn)
    out = {}
    for path, blob in data_dir_files(rmesh.pg).items():
        match = _RELATION_FILE.match(path)
        relation = names.get(match.group(1)) if match else None
        if relation and relation.startswith("hearth_"):
            schema, table = relation.split(".", 1)
            out[f"{schema.removeprefix('hearth_')}.pg:{table}:{path}"] = blob
        else:
            out[f"pg:{relation}:{path}" if relation else f"pg:{path}"] = blob
    return out


def raw_sources(rmesh) -> dict[str, bytes]:
    """Every raw byte the mesh keeps, by source name."""
    out: dict[str, bytes] = {}
    for path in sorted(Path(rmesh.data_dir).glob("*.db*")):      # main file, -wal, -shm
        out[path.name] = path.read_bytes()
    for path in sorted(Path(rmesh.log_dir).glob("*")):
        out[f"log:{path.name}"] = path.read_bytes()
    if rmesh.spans_path.exists():
        out["spans"] = rmesh.spans_path.read_bytes()
    if rmesh.backend == "postgres":
        import redis

        r = redis.Redis.from_url(rmesh.env_extra["HEARTH_REDIS_URL"])
        for key in r.scan_iter("*"):
            out[f"redis:{key.decode()}"] = key + (r.dump(key) or b"")
        for path in sorted(rmesh.redis_dir.rglob("*")):   # snapshot and AOF files, as Redis left them
            if path.is_file():
                out[f"redis:{path.relative_to(rmesh.redis_dir)}"] = path.read_bytes()
        out.update(postgres_sources(rmesh))
    return out


def found(rmesh, marker: str, *, data_only: bool = False) -> list[str]:
    """Sources holding ``marker``; ``data_only``: only the data-holding services' stores
    (and Redis, and the data services' PostgreSQL cluster), where ids must not survive
    either."""
    needle = marker.encode()
    hits = []
    for name, blob in raw_sources(rmesh).items():
        if data_only and not name.startswith((*DATA_SERVICES, "redis:", "pg:")):
            continue
        if needle in blob:
            hits.append(name)
    return hits


@pytest.fixture(scope="module")
def control(rmesh, client):
    """A household that is never deleted: the scan must keep finding its markers."""
    tag = f"C{RUN}"
    account, device = f"ac{tag}", f"dv{tag}"
    post_sessions(client, account, device, tag, time.time() - 9 * DAY, 12)
    assign_all(client, account)
    wait_delivered(rmesh, client, account, 12)
    return account, device, tag


def assert_control_visible(rmesh, control) -> None:
    account, device, tag = control
    if rmesh.backend == "postgres":   # the control's cached model, live, in the snapshot and the AOF
        hits = found(rmesh, account)
        assert f"redis:hearth:clustering:model:{account}" in hits and "redis:dump.rdb" in hits, hits
        assert any(h.startswith("redis:appendonlydir/") for h in hits), hits
    assert any(h.startswith("clustering") for h in found(rmesh, f"zr{tag}")), "scan cannot see clustering"
    assert any(h.startswith("attribution") for h in found(rmesh, f"zr{tag}")), "scan cannot see attribution"
    assert any(h.startswith("feedback") for h in found(rmesh, device, data_only=True)), "scan cannot see feedback"


# ---- one test per scope ----------------------------------------------------------------------

def test_device_scope_leaves_no_byte(rmesh, client, control):
    gone, keep = f"D{RUN}g", f"D{RUN}k"
    account = f"acD{RUN}"
    post_sessions(client, account, f"dv{gone}", gone, time.time() - 8 * DAY, 4)
    post_sessions(client, account, f"dv{keep}", keep, time.time() - 8 * DAY + 3600, 4)
    assign_all(client, account)
    wait_delivered(rmesh, client, account, 8)
    assert found(rmesh, f"zr{gone}") and found(rmesh, f"dv{gone}", data_only=True)

    job = delete(client, {"kind": "device", "account_id": account, "device_id": f"dv{gone}"})

    assert found(rmesh, f"zr{gone}") == [], job
    # The signed receipt lists what made the deletion physical, where and when.
    services = job["receipt"]["receipt"]["services"]
    for name in ("clustering", "attribution", "feedback"):
        purges = services[name]["purges"]
        assert purges and all(p["complete"] for p in purges), services[name]
        expected = "wal_checkpoint(TRUNCATE)" if rmesh.backend == "sqlite" else "pg_switch_wal(); CHECKPOINT"
        assert expected in purges[-1]["action"] and purges[-1]["at"] >= job["receipt"]["receipt"]["requested_at"]
    if rmesh.backend == "postgres":   # the Redis that persists rewrote its files after the erasure
        step = next(p for p in services["clustering"]["purges"] if p["store"] == "redis")
        assert step["complete"] and step["action"] == "BGSAVE + BGREWRITEAOF", step
    assert found(rmesh, f"dv{gone}", data_only=True) == []
    assert found(rmesh, f"zr{keep}") and found(rmesh, f"dv{keep}", data_only=True)
    assert_control_visible(rmesh, control)


def test_window_scope_leaves_no_byte_of_the_sessions_nor_of_what_was_derived(rmesh, client, control):
    old, new = f"W{RUN}o", f"W{RUN}n"
    account, device = f"acW{RUN}", f"dvW{RUN}"
    t_old, t_new = time.time() - 7 * DAY, time.time() - 3 * DAY
    post_sessions(client, account, device, old, t_old, 4)
    post_sessions(client, account, device, new, t_new, 4)
    h = assign_all(client, account)   # predictions made now, about sessions of both periods
    wait_delivered(rmesh, client, account, 8)
    old_sessions = [s["session_id"] for s in h["sessions"] if s["start"] < _iso(t_old + DAY)]
    assert len(old_sessions) == 4

    delete(client, {"kind": "window", "account_id": account, "start": _iso(t_old - 60), "end": _iso(t_old + DAY)})

    assert found(rmesh, f"zr{old}") == []
    for session_id in old_sessions:   # the predictions about deleted sessions went with them
        assert found(rmesh, session_id, data_only=True) == [], session_id
    assert found(rmesh, f"zr{new}")
    assert_control_visible(rmesh, control)


def test_person_scope_leaves_no_byte_of_the_persons_sessions(rmesh, client, control):
    adult, child = f"P{RUN}a", f"P{RUN}c"
    account = f"acP{RUN}"
    # Two people the person model tells apart: an adult on the TV late in the evening, a
    # child on the tablet after school, one session a day each (the model merges devices
    # whose hours match into one person).
    midnight = (time.time() // DAY - 9) * DAY
    post_sessions(client, account, f"dv{adult}", adult, midnight + 21 * 3600, 7, every_s=DAY)
    post_sessions(client, account, f"dv{child}", child, midnight + 16 * 3600, 7, kids=True, every_s=DAY)
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:   # the model is fitted in the background once there are enough sessions
        h = household(client, account)
        persons = {s["device_id"]: s["person_id"] for s in h["sessions"]}
        if all(persons.values()) and len(set(persons.values())) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    of_child = {s["person_id"] for s in h["sessions"] if s["device_id"] == f"dv{child}"}
    assert len(of_child) == 1 and None not in of_child, h["sessions"]
    assert of_child.isdisjoint({s["person_id"] for s in h["sessions"] if s["device_id"] == f"dv{adult}"})

    delete(client, {"kind": "person", "account_id": account, "person_id": of_child.pop()})

    assert found(rmesh, f"zr{child}-e") == []      # the person's events
    assert found(rmesh, f"zr{child}-hint") == []   # and the hint, also out of the refitted model
    assert found(rmesh, f"zr{adult}-e")
    assert_control_visible(rmesh, control)


def test_household_scope_leaves_no_byte(rmesh, client, control):
    tag = f"H{RUN}"
    account, device = f"ac{tag}", f"dv{tag}"
    post_sessions(client, account, device, tag, time.time() - 8 * DAY, 12)
    h = assign_all(client, account)
    wait_delivered(rmesh, client, account, 12)
    assert found(rmesh, account, data_only=True)
    assert found(rmesh, f"zr{tag}")

    delete(client, {"kind": "household", "account_id": account})

    assert found(rmesh, f"zr{tag}") == []
    assert found(rmesh, device, data_only=True) == []
    assert found(rmesh, account, data_only=True) == []
    # Nor in logs, trace file or audit outboxes (ids there are keyed pseudonyms); only the
    # privacy service's own files keep it: the receipt and the audit log name the scope.
    assert [src for src in found(rmesh, account) if not src.startswith("privacy")] == []
    for s in h["sessions"]:
        assert found(rmesh, s["session_id"], data_only=True) == []
    assert_control_visible(rmesh, control)


def test_household_model_is_sealed_at_rest_in_redis_and_sql(rmesh, client, control):
    """The model blob (feature statistics, profile hints) is encrypted under the
    household key in the SQL store and in its Redis copy: the control household's hint
    is in the model (the export, decrypted, shows it) but in no raw byte."""
    account, _, tag = control
    exported = client.get(f"/v1/household/{account}/export").json()
    import base64

    model = exported["services"]["clustering"]["household_model"]
    assert model and f"zr{tag}-hint".encode() in base64.b64decode(model["model_base64"])
    assert found(rmesh, f"zr{tag}-hint") == []


# ---- a household's data key rotated ----------------------------------------------------------

def sealed_needles(rmesh, account: str) -> list[bytes]:
    """Byte strings that only the household's current ciphertexts contain, read from the
    stores as stored: each sealed text value of its events and touchpoints (``enc1:`` +
    base64, kept as is), the nonce and first ciphertext bytes of each sealed feature vector."""
    queries = {"clustering": ["SELECT title_id, series_id, profile_hint FROM {}events WHERE account_id = %s",
                              "SELECT features FROM {}sessions WHERE account_id = %s"],
               "attribution": ["SELECT campaign FROM {}touchpoints WHERE account_id = %s"]}
    rows = []
    for service, sqls in queries.items():
        if rmesh.backend == "sqlite":
            import sqlite3

            conn = sqlite3.connect(f"file:{Path(rmesh.data_dir) / (service + '.db')}?mode=ro", uri=True)
            try:
                for sql in sqls:
                    rows += conn.execute(sql.format("").replace("%s", "?"), (account,)).fetchall()
            finally:
                conn.close()
        else:
            import psycopg

            with psycopg.connect(rmesh.pg.dsn) as conn:
                for sql in sqls:
                    rows += conn.execute(sql.format(f"hearth_{service}."), (account,)).fetchall()
    needles = []
    for value in (v for r in rows for v in r if v is not None):
        if isinstance(value, str):
            assert value.startswith("enc1:"), value
            needles.append(value.encode())
        elif len(bytes(value)) % 4:   # a sealed vector: 0x01, version, nonce, ciphertext
            needles.append(bytes(value)[5:5 + 12 + 16])
    return needles


def wrapped_key(rmesh, account: str, version: int) -> bytes:
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(rmesh.data_dir) / 'privacy.db'}?mode=ro", uri=True)
    try:
        (row,) = conn.execute("SELECT wrapped FROM data_keys WHERE account_id = ? AND dek_version = ?",
                              (account, version)).fetchall()
    finally:
        conn.close()
    return bytes(row[0])


def key_rows(rmesh, account: str) -> dict:
    """The household's key rows in privacy's store, as stored: {version: (wrapped,
    destroyed_at)}, the digest key under "digest"."""
    sqls = {"data": "SELECT dek_version, wrapped, destroyed_at FROM {}data_keys WHERE account_id = %s",
            "digest": "SELECT 'digest', wrapped, destroyed_at FROM {}digest_keys WHERE account_id = %s"}
    if rmesh.backend == "sqlite":
        import sqlite3

        conn = sqlite3.connect(f"file:{Path(rmesh.data_dir) / 'privacy.db'}?mode=ro", uri=True)
        try:
            rows = [r for sql in sqls.values() for r in conn.execute(sql.format("").replace("%s", "?"), (account,))]
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(rmesh.privacy_dsn) as conn:
            rows = [r for sql in sqls.values() for r in conn.execute(sql.format("hearth_privacy."), (account,))]
    return {r[0]: (bytes(r[1]), r[2]) for r in rows}


def sealed_vector(rmesh, account: str) -> bytes:
    """One sealed feature vector of the household, whole, as stored (a backup's copy)."""
    sql = "SELECT features FROM {}sessions WHERE account_id = %s"
    if rmesh.backend == "sqlite":
        import sqlite3

        conn = sqlite3.connect(f"file:{Path(rmesh.data_dir) / 'clustering.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute(sql.format("").replace("%s", "?"), (account,)).fetchall()
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(rmesh.pg.dsn) as conn:
            rows = conn.execute(sql.format("hearth_clustering."), (account,)).fetchall()
    return next(bytes(r[0]) for r in rows if len(bytes(r[0])) % 4)


def opens_with_the_stored_keys(rmesh, account: str, blob: bytes) -> bool:
    """Whether ``blob`` opens with what privacy's key store holds now and its master key
    (the development KEK file in the data directory): what a thief of a backup of the
    stores and of today's keys could read."""
    from services.common.errors import NotFound
    from services.common.field_crypto import FieldCipher
    from services.common.storage.sql import PostgresDatabase, SqliteDatabase
    from services.privacy.keys.app import KeyService, load_keks
    from services.privacy.keys.store import DataKeyStore

    keks, active = load_keks("", "", Path(rmesh.data_dir))
    db = (SqliteDatabase(Path(rmesh.data_dir) / "privacy.db") if rmesh.backend == "sqlite"
          else PostgresDatabase(rmesh.privacy_dsn, "hearth_privacy", 2))
    try:
        keys = KeyService(DataKeyStore(db), keks, active)
        FieldCipher(keys.data_key).decrypt(account, "features", blob)
        return True
    except NotFound:
        return False
    finally:
        db.close()


def rotate_key(rmesh, account: str) -> dict:
    """``hearth keys rotate-household`` with the admin's gateway key, as the runbook says."""
    import json
    import os
    import subprocess
    import sys

    from services.testing.mesh import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEARTH_ROLLOUT_API_KEY": rmesh.api_key}
    done = subprocess.run([sys.executable, "-m", "services.cli", "keys", "rotate-household", account,
                           "--gateway", rmesh.url], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SLOW_MACHINE_S)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_rotated_data_key_leaves_no_byte_only_the_old_key_opens(rmesh, client, control):
    """A household's data key rotated twice (v1 -> v2 -> v3), the first through ``hearth
    keys rotate-household``: after each rotation no ciphertext sealed under the older
    version is in any raw byte of the stores (their files, -wal included; on PostgreSQL
    every file of the data cluster, WAL included, and Redis's keys and files), version 2's
    wrapped key is gone from the privacy store (SQLite), and the household's data reads
    back the same. The new ciphertexts are found by the same scan, so it sees the stores."""
    tag = f"K{RUN}"
    account, device = f"ac{tag}", f"dv{tag}"
    post_sessions(client, account, device, tag, time.time() - 6 * DAY, 6)
    # A device erased before the rotations: its events' ids are kept as digests, keyed
    # with the household's digest key; sent again, they must stay duplicates throughout.
    gone = {"events": [{"event_id": f"zrG{tag}-e{i}", "account_id": account, "device_id": f"dg{tag}",
                        "device_type": "mobile", "ts": _iso(time.time() - 5 * DAY + i * 3 * 3600),
                        "kind": "play_start", "title_id": f"zrG{tag}-title", "genres": ["drama"],
                        "duration_s": 1800} for i in range(3)]}
    assert client.post("/v1/events", json=gone).json()["accepted"] == 3
    delete(client, {"kind": "device", "account_id": account, "device_id": f"dg{tag}"})

    def replayed() -> tuple[int, int]:
        r = client.post("/v1/events", json=gone)
        assert r.status_code == 200, r.text
        return r.json()["accepted"], r.json()["duplicates"]

    assert replayed() == (0, 3)
    assign_all(client, account)

    def readable(export: dict) -> tuple:
        return ([(e["event_id"], e["title_id"], e["profile_hint"]) for e in export["services"]["clustering"]["events"]],
                sorted((t["touchpoint_id"], t["campaign"]) for t in export["services"]["attribution"]["touchpoints"]))

    before = readable(client.get(f"/v1/household/{account}/export").json())
    assert len(before[0]) == 6 and len(before[1]) == 2

    def scan(needles: list[bytes]) -> dict[bytes, list[str]]:
        sources = raw_sources(rmesh)
        return {n: [name for name, blob in sources.items() if n in blob] for n in needles}

    v1 = sealed_needles(rmesh, account)
    assert len(v1) >= 6 * 3 + 2
    assert all(scan(v1).values())                         # the scan sees every one of them now

    keys_before = key_rows(rmesh, account)
    assert sorted(keys_before, key=str) == [1, "digest"] and keys_before[1][0] and keys_before["digest"][0]
    backup_copy = sealed_vector(rmesh, account)            # a backup of the stores taken now
    assert opens_with_the_stored_keys(rmesh, account, backup_copy)

    first = rotate_key(rmesh, account)
    # Version 1 destroyed like any older version (session 27: it was kept while the
    # household lived, the digests' key, and still opened a backup from before).
    assert (first["dek_version"], first["destroyed_versions"], first["kept_versions"]) == (2, [1], []), first
    assert first["reencrypted"]["clustering"] >= 6 * 3 and first["reencrypted"]["attribution"] == 2, first
    v2 = sealed_needles(rmesh, account)
    assert set(v1).isdisjoint(v2)
    assert {n: hits for n, hits in scan(v1).items() if hits} == {}
    after_first = key_rows(rmesh, account)
    assert after_first[1] == (b"", after_first[1][1]) and after_first[1][1], after_first   # a tombstone
    assert after_first["digest"] == keys_before["digest"]                  # carried over unchanged
    assert not opens_with_the_stored_keys(rmesh, account, backup_copy)
    assert replayed() == (0, 3)
    if rmesh.backend == "sqlite":                         # version 1's wrapped key: gone from privacy's files
        assert [name for name, blob in raw_sources(rmesh).items() if keys_before[1][0] in blob] == []
    old_key = wrapped_key(rmesh, account, 2) if rmesh.backend == "sqlite" else b""

    r = client.post(f"/v1/household/{account}/rotate-key")
    assert r.status_code == 200, r.text
    second = r.json()
    assert (second["dek_version"], second["destroyed_versions"], second["kept_versions"]) == (3, [2], []), second
    v3 = sealed_needles(rmesh, account)
    assert {n: hits for n, hits in scan(v2).items() if hits} == {}
    assert all(scan(v3).values())                         # the new ciphertexts: found
    if rmesh.backend == "sqlite":                         # version 2's wrapped key: gone from privacy's files
        assert wrapped_key(rmesh, account, 2) == b""
        assert [name for name, blob in raw_sources(rmesh).items() if old_key in blob] == []

    export = client.get(f"/v1/household/{account}/export").json()
    assert readable(export) == before
    keys = {k["dek_version"]: k for k in export["services"]["privacy"]["data_keys"]}
    assert keys[1]["destroyed_at"] and keys[2]["destroyed_at"] and not keys[3]["destroyed_at"], keys
    assert replayed() == (0, 3)
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:   # audited with the operator's principal
        records = client.get("/v1/audit", params={"event_type": "key_rotation", "limit": 100}).json()["records"]
        mine = [r for r in records if r["resource"] == f"household:{account}"]
        if len(mine) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r["principal"], r["outcome"], r["details"]["rpc"]) for r in mine] == \
        [("olivia", "success", "hearth.privacy.v1.Keys/RotateDataKey")] * 2, mine

    # The household's erasure shreds its digest key with its data keys.
    delete(client, {"kind": "household", "account_id": account})
    shredded = key_rows(rmesh, account)
    assert all(wrapped == b"" and destroyed for wrapped, destroyed in shredded.values()), shredded
    if rmesh.backend == "sqlite":
        assert [name for name, blob in raw_sources(rmesh).items() if keys_before["digest"][0] in blob] == []
    assert_control_visible(rmesh, control)


def _incomplete_purge_counts(rmesh) -> dict[str, float]:
    """``hearth_dek_rotation_purges_incomplete_total`` per service, from privacy's metrics."""
    text = httpx.get(f"http://127.0.0.1:{rmesh.metrics_ports['privacy']}/metrics", timeout=10).text
    found = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^hearth_dek_rotation_purges_incomplete_total\{service="([a-z]+)"\} ([0-9.e+]+)$', text, re.M)}
    assert {"clustering", "attribution"} <= set(found), "hearth_dek_rotation_purges_incomplete_total is not exported"
    return found


def _age_keys(rmesh, account: str) -> None:
    """The household's data keys made long ago: the only candidate of a batch over keys
    older than ten years."""
    sql = "UPDATE {}data_keys SET created_at = '2001-01-01T00:00:00+00:00' WHERE account_id = %s"
    if rmesh.backend == "sqlite":
        import sqlite3

        conn = sqlite3.connect(Path(rmesh.data_dir) / "privacy.db", timeout=30)
        try:
            with conn:
                conn.execute(sql.format("").replace("%s", "?"), (account,))
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(rmesh.privacy_dsn) as conn:
            conn.execute(sql.format("hearth_privacy."), (account,))


def _tombstones(rmesh, account: str) -> dict[int, bool]:
    """{version: destroyed (its wrapped key overwritten and destroyed_at set)} as stored."""
    return {v: wrapped == b"" and destroyed is not None
            for v, (wrapped, destroyed) in key_rows(rmesh, account).items() if v != "digest"}


def test_a_rotation_whose_purge_is_incomplete_completes_and_names_the_store(rmesh, client, control):
    """The completion rule of a data key rotation: it completes — older versions destroyed —
    once every store's Rekey found nothing left under them, whatever the purge of the old
    ciphertexts reported, and names each purge that did not finish. On PostgreSQL a
    replication slot keeps the WAL segments that hold the old ciphertexts (the real
    clustering and attribution purges report themselves incomplete, "1 replication
    slot(s)"): the rotation answers 200, version 1 is a tombstone in privacy's key store
    (what the purge could not reach opens under no key Hearth holds), the answer's
    ``incomplete_purges`` names clustering's and attribution's purge,
    ``hearth_dek_rotation_purges_incomplete_total{service}`` counts it; a batch job over
    the household does the same (its household ``completed``, version 2 destroyed, the
    purges named). Session 27's first rule held the rotation open instead (503, version
    kept live, the job's household ``held``): this test failed against it. On SQLite
    (nothing keeps its WAL) both complete and name nothing."""
    tag = f"Q{RUN}"   # the incomplete purge (H is the household scope test's)
    account, device = f"ac{tag}", f"dv{tag}"
    post_sessions(client, account, device, tag, time.time() - 6 * DAY, 4)
    counts_before = _incomplete_purge_counts(rmesh)
    slot = None
    if rmesh.backend == "postgres":
        import psycopg

        slot = psycopg.connect(rmesh.pg.dsn, autocommit=True)
        slot.execute("SELECT pg_create_physical_replication_slot(%s, true)", (f"hold_{tag.lower()}",))
    try:
        r = client.post(f"/v1/household/{account}/rotate-key")
        assert r.status_code == 200, r.text
        done = r.json()
        assert (done["dek_version"], done["destroyed_versions"], done["resumed"]) == (2, [1], False), done
        assert _tombstones(rmesh, account) == {1: True, 2: False}
        named = {p["service"] for p in done["incomplete_purges"]}
        counts = _incomplete_purge_counts(rmesh)
        if slot is None:
            assert done["incomplete_purges"] == [] and counts == counts_before, (done, counts)
        else:
            assert {"clustering", "attribution"} <= named, done["incomplete_purges"]
            for p in done["incomplete_purges"]:
                assert p["store"] == "postgres" and "replication slot" in p["action"], p
            for service in ("clustering", "attribution"):
                assert counts[service] == counts_before[service] + 1, (service, counts, counts_before)

        # The batch job: its household completed, not held, the purges named.
        _age_keys(rmesh, account)
        r = client.post("/v1/keys/rotate-households", json={"older_than_days": 3650, "limit": 1000})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + SLOW_MACHINE_S + 30
        while (job := client.get(f"/v1/keys/rotate-households/{job_id}").json())["state"] == "running" \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert job["state"] == "completed", job
        (h,) = [h for h in job["households"] if h["account_id"] == account]
        assert (h["outcome"], h["dek_version"], h["destroyed_versions"]) == ("completed", 3, [2]), h
        assert _tombstones(rmesh, account) == {1: True, 2: True, 3: False}
        if slot is None:
            assert h["incomplete_purges"] == [] and h["detail"] == "", h
        else:
            assert {"clustering", "attribution"} <= {p["service"] for p in h["incomplete_purges"]}, h
            assert "did not finish" in h["detail"] and "replication slot" in h["detail"], h["detail"]
            assert account not in h["detail"], h["detail"]
    finally:
        if slot is not None:
            slot.execute("SELECT pg_drop_replication_slot(%s)", (f"hold_{tag.lower()}",))
            slot.close()
    export = client.get(f"/v1/household/{account}/export").json()
    assert len(export["services"]["clustering"]["events"]) == 4
    assert {k["dek_version"]: bool(k["destroyed_at"]) for k in export["services"]["privacy"]["data_keys"]} == \
        {1: True, 2: True, 3: False}
