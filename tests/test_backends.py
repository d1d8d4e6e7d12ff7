"""The backend fixtures: PostgreSQL tests skip without a server, fail if one is required, never skip with one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import NO_POSTGRES, POSTGRES_ENV, postgres_base_url

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A small suite using this conftest: one test on both backends, one on PostgreSQL only.

    It runs in a subprocess: an in-process run would unload the database
    drivers it imported, and later tests would see two copies of them.
    """
    monkeypatch.delenv("KISSBOT_REQUIRE_POSTGRES", raising=False)
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(
        test_inner="""
        def test_both(store_url):
            assert store_url.startswith(("sqlite", "postgresql"))

        def test_pg_only(postgresql_url):
            assert "search_path" in postgresql_url
        """
    )
    return pytester


def test_without_a_server_postgresql_tests_skip_and_say_why(suite, monkeypatch):
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    result = suite.runpytest_subprocess("-ra")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["PostgreSQL tests: 0 passed, 2 skipped, 0 failed", f"SKIPPED * {NO_POSTGRES}"])


def test_a_required_server_that_is_missing_fails(suite, monkeypatch):
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    monkeypatch.setenv("KISSBOT_REQUIRE_POSTGRES", "1")
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=2)


def test_with_a_server_no_postgresql_test_skips(suite):
    postgres_base_url()  # this test itself needs the server
    suite.makepyfile(
        test_skipping="""
        import pytest

        def test_skips_on_postgresql(store_url):
            if store_url.startswith("postgresql"):
                pytest.skip("pretend PostgreSQL cannot do this")
        """
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines([
        f"*PostgreSQL test skipped although {POSTGRES_ENV} is set: Skipped: pretend PostgreSQL cannot do this*",
        "PostgreSQL tests: 2 passed, 0 skipped, 1 failed",
    ])
