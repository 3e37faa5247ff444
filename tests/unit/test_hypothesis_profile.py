"""The suite's Hypothesis profile (tests/conftest.py) is the one in force: a @given test
with no settings of its own runs with no deadline (a timed test otherwise: 200 ms per
example, failed under load in session 35), without the too_slow health check, and prints
its reproduction blob when it fails; a test's own settings still add to it."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@given(st.integers())
def test_a_given_test_without_settings_of_its_own_has_no_deadline(_):
    assert settings().deadline is None
    assert test_a_given_test_without_settings_of_its_own_has_no_deadline._hypothesis_internal_use_settings.deadline \
        is None


def test_the_profile_keeps_every_health_check_but_too_slow_and_prints_the_blob():
    profile = settings.get_profile("hearth-tests")
    assert settings.default.deadline is None and settings.get_current_profile_name() == "hearth-tests"
    assert list(profile.suppress_health_check) == [HealthCheck.too_slow]
    assert profile.print_blob is True


@settings(max_examples=7)
@given(st.integers())
def test_a_tests_own_example_count_stands_and_the_profile_fills_the_rest(_):
    own = test_a_tests_own_example_count_stands_and_the_profile_fills_the_rest._hypothesis_internal_use_settings
    assert own.max_examples == 7 and own.deadline is None
