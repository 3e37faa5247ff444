"""The data directory's size limit setting (a Kubernetes quantity) and what the process
reports of its data directory and volume (services/common/telemetry.watch_data_dir)."""

from __future__ import annotations

import math
import os

import pytest

from services.common import config, telemetry


@pytest.mark.parametrize("text,expected", [
    ("1Gi", 2**30), ("500Mi", 500 * 2**20), ("2G", 2 * 10**9), ("1.5Gi", 3 * 2**29),
    ("1073741824", 2**30), ("", 0), ("  64Ki ", 64 * 2**10),
    ("1e9", 10**9), ("5E+8", 5 * 10**8), (".5Gi", 2**29), ("2.Mi", 2 * 2**20),   # review26: refused before
    # attack27: the exa suffixes were read as an exponent and refused ("could not convert
    # string to float"); a fraction of a byte was 0, "no limit known".
    ("1E", 10**18), ("2Ei", 2 * 2**60), ("1E3", 1000), ("0.5", 1), ("1.0000001Ki", 1025),
])
def test_a_size_limit_is_read_as_the_chart_writes_it(text, expected):
    assert config.byte_quantity(text) == expected


@pytest.mark.parametrize("bad", ["1GB", "-1Gi", "Gi", "1 Gi", "one", "100m", "1e-3", "1ki", ".",
                                 # attack27: 1e400 stopped the process with an OverflowError traceback;
                                 # digits other than 0-9 (Arabic-Indic here) were read as numbers
                                 "1e400", "9Ei", "\u0661\u0662\u0663"])
def test_a_bad_size_limit_stops_the_process_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv("HEARTH_DATA_DIR_SIZE_LIMIT", bad)
    with pytest.raises(config.ConfigError) as info:
        config.load()
    assert "HEARTH_DATA_DIR_SIZE_LIMIT" in str(info.value)
    assert "1Gi" in str(info.value)


def test_the_directory_counts_allocated_blocks_of_every_file_below_it(tmp_path):
    (tmp_path / "sub").mkdir()
    with open(tmp_path / "a.db", "wb") as fh:
        fh.write(b"x" * 300_000)
    with open(tmp_path / "sub" / "reserve.bin", "wb") as fh:   # preallocated, never written
        os.posix_fallocate(fh.fileno(), 0, 1 << 20)
    with open(tmp_path / "sparse", "wb") as fh:                # holes take no space
        fh.truncate(64 << 20)
    used = telemetry.directory_bytes(tmp_path)
    assert 300_000 + (1 << 20) <= used < 300_000 + (1 << 20) + 64 * 1024
    assert math.isnan(telemetry.directory_bytes(tmp_path / "missing"))


def test_the_gauges_follow_the_watched_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"y" * 100_000)
    telemetry.watch_data_dir(tmp_path, 5 * 2**20)
    try:
        samples = {s.name: s.value for metric in (telemetry.DATA_DIR_USED, telemetry.DATA_DIR_LIMIT,
                                                  telemetry.DATA_VOLUME_FREE, telemetry.DATA_VOLUME_SIZE)
                   for s in metric.collect()[0].samples}
        assert samples["hearth_data_dir_used_bytes"] >= 100_000
        assert samples["hearth_data_dir_limit_bytes"] == 5 * 2**20
        stat = os.statvfs(tmp_path)
        assert samples["hearth_data_volume_size_bytes"] == stat.f_blocks * stat.f_frsize
        assert 0 < samples["hearth_data_volume_free_bytes"] <= samples["hearth_data_volume_size_bytes"]
        telemetry.watch_data_dir(tmp_path / "gone", 0)   # no limit known, an unreadable path
        samples = {s.name: s.value for metric in (telemetry.DATA_DIR_USED, telemetry.DATA_DIR_LIMIT,
                                                  telemetry.DATA_VOLUME_FREE)
                   for s in metric.collect()[0].samples}
        assert all(math.isnan(v) for v in samples.values()), samples
    finally:
        telemetry.watch_data_dir(tmp_path, 0)
