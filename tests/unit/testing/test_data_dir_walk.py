"""tests/helpers/servers.data_dir_files takes one consistent picture of a PostgreSQL data
directory: a checkpoint during the walk that flushes a page into ``base/`` after it was read
and removes the WAL segment that held the row before it is reached would otherwise leave a
value in neither (the remnants test missed a sealed value that way on PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.helpers.servers import data_dir_files

ROW = b"enc1:the-row"


def _cluster(root: Path) -> tuple[Path, Path]:
    (root / "base" / "5").mkdir(parents=True)
    (root / "pg_wal").mkdir()
    heap, segment = root / "base" / "5" / "16384", root / "pg_wal" / "000000010000000000000001"
    heap.write_bytes(b"page without the row")          # the row's page not flushed yet
    segment.write_bytes(b"wal record: " + ROW)          # the row only in the WAL
    return heap, segment


def test_a_checkpoint_during_the_walk_does_not_hide_a_row(tmp_path, monkeypatch):
    heap, segment = _cluster(tmp_path)
    real_read = Path.read_bytes
    checkpointed = []

    def read_bytes(self: Path) -> bytes:
        data = real_read(self)
        if self == heap and not checkpointed:          # right after the heap file was read:
            heap.write_bytes(b"page with " + ROW)       # the checkpoint flushes the page
            segment.unlink()                            # and removes the segment
            checkpointed.append(True)
        return data

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    files = data_dir_files(SimpleNamespace(data_dir=tmp_path))
    assert checkpointed
    assert [name for name, blob in files.items() if ROW in blob] == ["base/5/16384"]


def test_a_quiet_directory_is_read_whole_once(tmp_path, monkeypatch):
    _cluster(tmp_path)
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))
    files = data_dir_files(SimpleNamespace(data_dir=tmp_path))
    assert sorted(files) == ["base/5/16384", "pg_wal/000000010000000000000001"]
    assert len(reads) == 2
