"""privacy's own audit records on a full disk, through the real audit log on SQLite.

Session 23's drill filled the data directory's volume (a tmpfs) under load: privacy's
log could not commit, and privacy's own sink (no outbox: it appends locally) dropped a
batch after ``max_attempts``. Here a child process gets the same failure without a
mount or root: a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored) that no file may
grow past, so the log's WAL cannot take a frame ("disk I/O error" / "database or disk
is full": UNAVAILABLE) until the limit is lifted ("the disk frees"). Every record must
then be in the log once, in the order recorded, and the log (hash chain, tree heads)
must verify.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent('''
    import json, resource, signal, sys, time
    from pathlib import Path

    from services.common import audit
    from services.common.identity import Principal, Role
    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.audit.app import AuditApp, LocalAuditTransport
    from services.privacy.keys.signing import generate_private_key
    from services.privacy.migrations import MIGRATIONS

    who = Principal("svc:privacy", Role.SERVICE)
    db = SqliteDatabase(Path(sys.argv[1]) / "privacy.db")
    migrate(db, MIGRATIONS)
    app = AuditApp(db, generate_private_key(), max_delay_s=0.001)
    sink = audit.AuditSink(LocalAuditTransport(app), component="t-privacy-full", max_attempts=2,
                           backoff_s=0.01, max_spool_backoff_s=0.05, max_delay_s=0.005)

    def record(i):
        sink.record(audit.KEY_ROTATION, f"household:k{i}", principal=who)

    for i in range(20):
        record(i)
    assert sink.flush(10)
    failures = lambda: audit.SEND_FAILURES.labels("t-privacy-full", "Unavailable")._value.get()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))   # the disk is full
    for i in range(20, 60):
        record(i)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (failures() < 4 or sink.pending < 40) and not sink.dropped:
        time.sleep(0.01)
    during = {"failures": failures(), "pending": sink.pending, "dropped": sink.dropped}
    for i in range(60, 70):
        record(i)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # the disk frees
    flushed = sink.flush(20)
    sink.close()
    lines = [json.loads(line) for line in app.export_lines()]
    resources = [line["entry"]["resource"] for line in lines if "entry" in line]
    print(json.dumps({"during": during, "flushed": flushed, "dropped": sink.dropped,
                      "resources": resources, "verified": app.verify().result.ok}))
    app.close()
''')


def test_privacys_own_records_survive_a_full_disk_in_order_once_each(tmp_path):
    # -B: the limit applies to every file the child writes, and a module it imports late
    # (psycopg, on the writer's error path) would leave a truncated .pyc in the run's
    # bytecode cache (PYTHONPYCACHEPREFIX, tests/conftest.py) that broke every later
    # process of the run importing it ("marshal data too short").
    done = subprocess.run([sys.executable, "-B", "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["during"]["failures"] >= 4 and out["during"]["dropped"] == 0, out["during"]
    assert out["flushed"] and out["dropped"] == 0
    assert out["resources"] == [f"household:k{i}" for i in range(70)]
    assert out["verified"]
