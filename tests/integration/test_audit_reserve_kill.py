"""Audit records held on a full disk survive a SIGKILL of the process (session 25, disk25).

A real process runs privacy's own sink over the real audit log on SQLite, both in a tmpfs
of 4 MB. The tmpfs is filled, so the log cannot commit and the sink holds the records in
memory; the process is SIGKILLed; the space is freed and a new process opens the same
log: every record is in it once, in the order recorded, and the log verifies. Until
session 25 the held records died with the process: this test, with the sink not using the
reserve file, found only the 20 records delivered before the disk filled (k20..k59 lost).

The tmpfs lives in a mount namespace of its own, held by a ``sleep`` the test starts
(tied to the test run), and both processes enter it: nothing is mounted on the machine's
own tree, and the mount goes with the holder. As root ``unshare --mount``; otherwise an
unprivileged user namespace (``unshare --user --map-root-user --mount``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from services.common.child_process import spawn_tied, stop_group

CHILD = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path

    from services.common import audit
    from services.common.identity import Principal, Role
    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.audit.app import AuditApp, LocalAuditTransport, load_signing_key
    from services.privacy.migrations import MIGRATIONS

    mode, data, reserve_bytes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    who = Principal("svc:privacy", Role.SERVICE)
    if mode == "replay":
        (data / "filler").unlink()   # the space is back
    db = SqliteDatabase(data / "privacy.db")
    migrate(db, MIGRATIONS)
    app = AuditApp(db, load_signing_key(data_dir=data), max_delay_s=0.001)
    reserve = audit.reserve_for(data, "t-kill", reserve_bytes)
    sink = audit.AuditSink(LocalAuditTransport(app), component="t-kill", reserve=reserve, max_attempts=2,
                           backoff_s=0.01, max_spool_backoff_s=0.05, max_delay_s=0.005)
    if mode == "replay":
        flushed = sink.flush(30)
        sink.close()
        lines = [json.loads(line) for line in app.export_lines()]
        print(json.dumps({"flushed": flushed, "dropped": sink.dropped, "verified": app.verify().result.ok,
                          "resources": [line["entry"]["resource"] for line in lines if "entry" in line]}))
        sys.exit(0)
    for i in range(20):
        sink.record(audit.KEY_ROTATION, f"household:k{i}", principal=who)
    assert sink.flush(10)
    with open(data / "filler", "ab", buffering=0) as f:   # the disk fills
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    f.write(b"\\0" * size)
                except OSError:
                    break
    for i in range(20, 60):
        sink.record(audit.KEY_ROTATION, f"household:k{i}", principal=who)
    held = lambda: audit.HELD.labels("t-kill")._value.get()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (held() >= 40 and (reserve is None or reserve.count >= 40)):
        time.sleep(0.01)
    print(json.dumps({"held": held(), "reserved": reserve.count if reserve else 0, "dropped": sink.dropped}),
          flush=True)
    time.sleep(600)   # SIGKILLed here, holding the records
''')


def _shared_mount_holding(path) -> bool:
    """Whether the mount that holds ``path`` (the longest mount point above it in this
    process's /proc/self/mountinfo) propagates mounts to a peer group."""
    best, shared = "", False
    for line in open("/proc/self/mountinfo", encoding="utf-8"):
        fields = line.split(" - ")[0].split()
        point, optional = fields[4], fields[6:]
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, shared = point, any(f.startswith("shared:") for f in optional)
    return shared


def _namespace(tmp_path):
    """A process holding a mount namespace with a 4 MB tmpfs at tmp_path/vol, and the
    command prefix that enters it."""
    volume = tmp_path / "vol"
    volume.mkdir()
    root = os.geteuid() == 0
    unshare = ["unshare", "--mount"] if root else ["unshare", "--user", "--map-root-user", "--mount"]
    # unshare makes every mount private first ("--propagation private", its default). In a
    # chroot (the fresh-machine drill) "/" is no mount point and that fails with EINVAL;
    # there the namespace keeps the propagation it has, which is safe when the mount that
    # holds the volume shares with no peer (nothing then reaches the machine's own tree).
    propagations = ["private"] + ([] if _shared_mount_holding(volume) else ["unchanged"])
    for propagation in propagations:
        holder = spawn_tied([*unshare, "--propagation", propagation, "sh", "-c",
                             f"mount -t tmpfs -o size=4m tmpfs {volume} && echo ready && exec sleep 600"],
                            stdout=subprocess.PIPE, text=True)
        if holder.stdout.readline().strip() == "ready":
            break
        holder.wait(10)
    else:
        raise AssertionError(f"could not mount a tmpfs in a mount namespace (propagation tried: {propagations})")
    # --root / --wd: the holder's root and working directory, which are the test's (entering
    # a mount namespace otherwise puts a process at that namespace's own root: in a chroot,
    # outside it).
    enter = ["nsenter", "-t", str(holder.pid), "-m", "--root", "--wd"] if root else \
        ["nsenter", "-t", str(holder.pid), "-U", "-m", "--root", "--wd", "--preserve-credentials"]
    return holder, enter, volume


def _kill_while_holding_then_restart(tmp_path, reserve_bytes: int) -> tuple[dict, dict]:
    holder, enter, volume = _namespace(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    try:
        # -B: no .pyc written from the full volume's processes (test_audit_full_disk.py).
        child = spawn_tied([*enter, sys.executable, "-B", "-c", CHILD, "hold", str(volume), str(reserve_bytes)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = child.stdout.readline()
        assert line, child.stderr.read()[-3000:]
        during = json.loads(line)
        os.killpg(child.pid, signal.SIGKILL)   # the process and its group (nsenter's child)
        child.wait(10)
        time.sleep(0.2)
        done = subprocess.run([*enter, sys.executable, "-B", "-c", CHILD, "replay", str(volume), str(reserve_bytes)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return during, json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stop_group(holder, 5)


def test_audit_records_held_on_a_full_disk_survive_a_sigkill(tmp_path):
    during, after = _kill_while_holding_then_restart(tmp_path, 256 * 1024)
    assert during["held"] == 40 and during["dropped"] == 0, during
    assert after["resources"] == [f"household:k{i}" for i in range(60)]   # once each, in order
    assert during["reserved"] == 40
    assert after["flushed"] and after["dropped"] == 0
    assert after["verified"]

