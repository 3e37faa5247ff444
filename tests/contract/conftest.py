"""Contract tests use the shared ``start_service`` fixture from tests/conftest.py."""

from tests.conftest import ADMIN  # noqa: F401  (re-exported for the tests)
