"""pytest-timeout's limit grows with the machine's load measured as a test starts
(tests/conftest.py ``pytest_timeout_set_timer``): a CPU-bound test at load 25 on 2 cores
gets about 12 times the wall time it takes idle, and a hang is still stopped."""

from __future__ import annotations

import pytest

from tests.helpers.waiting import MAX_SLOWDOWN, cpu_slowdown


@pytest.mark.parametrize(("load1", "cores", "slowdown"), [
    (0.1, 2, 1.0),              # idle: the limit as written
    (2.0, 2, 1.0),              # every core busy, nothing waiting
    (5.0, 2, 2.5),              # a drill beside the suite
    (25.0, 2, MAX_SLOWDOWN),    # ~12.5, held at the cap: a hang is stopped at most 8 limits later
    (25.0, 8, 3.125),
])
def test_the_slowdown_is_the_load_per_core_between_1_and_the_cap(load1, cores, slowdown):
    assert cpu_slowdown(load1, cores) == pytest.approx(slowdown)


def test_the_slowdown_is_measured_now():
    assert 1.0 <= cpu_slowdown() <= MAX_SLOWDOWN


pytest_plugins = ["pytester"]


def test_a_test_past_its_scaled_limit_still_fails_on_the_timeout(pytester, monkeypatch):
    """The plugin's own timer runs with the limit times the slowdown: a test that sleeps
    past it fails (here the load is pinned at 4 per core: a 0.25 s limit is 1 s)."""
    monkeypatch.setattr("os.getloadavg", lambda: (8.0, 8.0, 8.0))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    pytester.makeconftest("from tests.conftest import pytest_timeout_set_timer  # noqa: F401\n")
    pytester.makepyfile("""
        import time, pytest
        @pytest.mark.timeout(0.25)
        def test_inside():
            time.sleep(0.5)
        @pytest.mark.timeout(0.25)
        def test_past():
            time.sleep(1.5)
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Timeout (>1.0s)*"])
