"""The audit sink's reserve file: records held in memory on a full disk survive a kill.

Session 24 kept the records neither the audit log nor the disk outbox takes (a full disk
under both) in memory; a process killed then lost them all. Session 25 (disk25): they are
also written into a file allocated when the process starts (``AuditReserve``), and the
next start queues them first. Here the file's own rules (order, a torn tail, emptied once
delivered, full) and a sink "killed" (abandoned, its thread never closing it) and started
again on the same file; tests/integration/test_audit_reserve_kill.py SIGKILLs a real
process on a real full tmpfs.
"""

from __future__ import annotations

import os

from services.common import audit
from services.common.audit import AuditReserve, AuditSink
from services.common.identity import Principal, Role
from tests.unit.common.test_audit_sink_full_disk import _FullDiskOutbox, _Log, _wait_for

ALICE = Principal("alice", Role.ANALYST)


def _records(n: int, start: int = 0) -> list[audit.AuditRecord]:
    return [audit.make_record(audit.READ_HOUSEHOLD, f"household:h{i}", principal=ALICE) for i in range(start, start + n)]


def test_the_file_is_allocated_at_start_and_gives_back_what_was_written_in_order(tmp_path):
    path = tmp_path / "r.bin"
    reserve = AuditReserve(path, 64 * 1024)
    assert path.stat().st_size == 64 * 1024 and os.stat(path).st_blocks * 512 >= 64 * 1024
    written = _records(30)
    assert reserve.write(written[:10]) == 10
    assert reserve.write(written) == 20          # the first ten are in already
    reserve.close()
    again = AuditReserve(path, 64 * 1024)
    assert again.replay() == written
    assert again.count == 30


def test_emptied_once_every_record_is_delivered_and_a_later_generation_hides_older_entries(tmp_path):
    path = tmp_path / "r.bin"
    reserve = AuditReserve(path, 64 * 1024)
    first = _records(20)
    reserve.write(first)
    reserve.forget([r.record_id for r in first[:19]])
    assert AuditReserve(path, 64 * 1024).replay() == first   # one still held: all stay
    reserve.forget([first[19].record_id])
    assert AuditReserve(path, 64 * 1024).replay() == []
    assert b"household:" not in path.read_bytes()   # nothing of the delivered records lingers
    second = _records(3, 100)
    reserve.write(second)   # over the start of the first generation's entries
    assert AuditReserve(path, 64 * 1024).replay() == second


def test_a_torn_last_entry_ends_the_replay_and_a_full_file_keeps_what_fits(tmp_path):
    path = tmp_path / "r.bin"
    reserve = AuditReserve(path, 4096)
    records = _records(40)
    n = reserve.write(records)
    assert 0 < n < 40                      # ~300 bytes a record: the rest stays in memory only
    assert reserve.write(records[n:]) == 0 and reserve.full   # the sink offers it no more
    reserve.forget([r.record_id for r in records[:n]])
    assert not reserve.full and reserve.write(records[n:n + 1]) == 1
    reserve.forget([records[n].record_id])
    assert reserve.write(records) == n
    reserve.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:            # the last entry half-written when the process died
        last = f.read().rfind(b'{"ts":')   # the payload of the last entry
        f.seek(last + 20)
        f.write(b"#" * 10)
    assert path.stat().st_size == size
    assert AuditReserve(path, 4096).replay() == records[:n - 1]


def test_records_held_on_a_full_disk_are_delivered_after_a_kill_and_restart(tmp_path):
    """Without the reserve the second sink starts empty: the 40 held records are lost."""
    component = "t-reserve-kill"
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "outbox.db")
    reserve = AuditReserve(tmp_path / "reserve.bin", 256 * 1024)
    sink = AuditSink(log, component=component, outbox=outbox, reserve=reserve, max_attempts=2, spool_after=1,
                     backoff_s=0.01, max_spool_backoff_s=0.05, max_delay_s=0.005)
    records = _records(40)
    for r in records[:25]:
        sink.submit(r)
    assert _wait_for(lambda: reserve.count == 25 and audit.HELD.labels(component)._value.get() == 25)
    for r in records[25:]:   # arriving behind the held ones: in the file within ~max_delay_s
        sink.submit(r)
    assert _wait_for(lambda: reserve.count == 40)
    assert log.records == [] and sink.dropped == 0
    # The process is killed: its sink never closes, its memory is gone. The disk frees.
    sink._stop.set()
    sink._closing.set()
    sink._thread.join(5)
    outbox.close()
    log.up.set()
    restarted = AuditSink(log, component=component, outbox=audit.AuditOutbox(tmp_path / "outbox.db"),
                          reserve=AuditReserve(tmp_path / "reserve.bin", 256 * 1024), max_delay_s=0.005)
    assert restarted.flush(10)
    assert [r.record_id for r in log.records] == [r.record_id for r in records]
    assert restarted.dropped == 0
    restarted.close()
    assert AuditReserve(tmp_path / "reserve.bin", 256 * 1024).replay() == []   # emptied once delivered


def test_a_sink_closing_on_a_full_disk_leaves_its_held_records_in_the_file_not_dropped(tmp_path):
    component = "t-reserve-close"
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "outbox.db")
    sink = AuditSink(log, component=component, outbox=outbox, reserve=AuditReserve(tmp_path / "reserve.bin", 256 * 1024),
                     max_attempts=2, spool_after=1, backoff_s=0.01, max_spool_backoff_s=0.05, max_delay_s=0.005)
    records = _records(12)
    for r in records:
        sink.submit(r)
    assert _wait_for(lambda: audit.HELD.labels(component)._value.get() == 12)
    before = audit.DROPPED.labels(component, "outbox_failed")._value.get()
    sink.close(2)
    assert audit.DROPPED.labels(component, "outbox_failed")._value.get() == before   # not lost: kept
    assert AuditReserve(tmp_path / "reserve.bin", 256 * 1024).replay() == records


def test_a_file_left_by_an_earlier_run_is_replayed_with_the_reserve_turned_off(tmp_path):
    assert audit.reserve_for(tmp_path, "t-off", 0) is None   # no file, none made
    left = AuditReserve(tmp_path / "audit-reserve-t-off.bin", 64 * 1024)
    records = _records(5)
    left.write(records)
    left.close()
    assert audit.reserve_for(tmp_path, "t-off", 0).replay() == records


def test_records_written_after_a_failed_emptying_still_replay(tmp_path, monkeypatch):
    """The zeroes over delivered entries cannot be written (an I/O error): the file keeps
    its generation, so records appended next replay after the old ones (appended once by
    the log), never hidden behind a generation the header does not carry."""
    path = tmp_path / "r.bin"
    reserve = AuditReserve(path, 64 * 1024)
    first, second = _records(3), _records(2, 10)
    reserve.write(first)
    real_pwrite = os.pwrite

    def failing(fd, data, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwrite", failing)
    reserve.forget([r.record_id for r in first])
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    reserve.write(second)
    assert AuditReserve(path, 64 * 1024).replay() == first + second


def test_a_reserve_file_that_cannot_be_written_says_so_once_not_at_every_offer(tmp_path, monkeypatch, caplog):
    """review25: on a copy-on-write filesystem (btrfs, ZFS) a block written once needs new
    space when written again, so on a full disk the reserve's writes fail (ENOSPC) however
    it was allocated. The sink offers it the queue's new records every max_delay_s (50 ms)
    while it holds them, and each failure logged an ERROR: 20 lines a second on the full
    disk. Now the first failure of a run is logged, and the next after a write succeeded."""
    reserve = AuditReserve(tmp_path / "r.bin", 64 * 1024)
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level("ERROR", logger="hearth.audit"):
        for i in range(100):
            assert reserve.write(_records(1, i)) == 0
        assert len([r for r in caplog.records if "could not be written" in r.getMessage()]) == 1
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        assert reserve.write(_records(2, 500)) == 2
        monkeypatch.setattr(os, "pwrite", full)
        assert reserve.write(_records(1, 600)) == 0
        assert len([r for r in caplog.records if "could not be written" in r.getMessage()]) == 2


def test_replicas_on_one_data_dir_keep_their_held_records_in_files_of_their_own(tmp_path):
    """review25: processes of one component started on one data dir are replicas (two
    clustering processes in tests/e2e/test_outbox_replicas_e2e.py; docs/security.md), and
    each opened the same audit-reserve-<component>.bin: the second wrote its held records
    over the first's, and emptying its own zeroed the first's and bumped the generation, so
    a kill of the first lost what it held. Each process now holds a file of its own (a lock
    the kernel drops when it dies); a restart takes a free one and replays it."""
    first = audit.reserve_for(tmp_path, "t-rep", 64 * 1024)
    second = audit.reserve_for(tmp_path, "t-rep", 64 * 1024)
    held_first, held_second = _records(5), _records(5, 100)
    first.write(held_first)
    second.write(held_second)
    second.forget([r.record_id for r in held_second])   # the second delivered its own
    first.close()                                       # the first killed while holding
    second.close()
    restarted = [audit.reserve_for(tmp_path, "t-rep", 64 * 1024) for _ in range(2)]
    assert [r.replay() for r in restarted] == [held_first, []]


def test_closing_on_a_full_disk_with_every_held_record_in_the_file_logs_no_error(tmp_path, caplog):
    # ops33: a process stopped on a full data directory logged "audit outbox write failed while
    # closing: N records not spooled" at ERROR with a traceback, then that the same N stay in
    # the reserve file: nothing was lost, yet the soak and an operator's alert read a loss.
    component = "t-reserve-close-quiet"
    outbox = _FullDiskOutbox(tmp_path / "outbox.db")
    sink = AuditSink(_Log(), component=component, outbox=outbox,
                     reserve=AuditReserve(tmp_path / "reserve.bin", 256 * 1024), max_attempts=2, spool_after=1,
                     backoff_s=0.01, max_spool_backoff_s=0.05, max_delay_s=0.005)
    for r in _records(6):
        sink.submit(r)
    assert _wait_for(lambda: audit.HELD.labels(component)._value.get() == 6)
    with caplog.at_level("WARNING", logger="hearth.audit"):
        sink.close(2)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert any("6 audit records stay in the reserve file" in r.getMessage() for r in caplog.records)
    assert sink.dropped == 0
