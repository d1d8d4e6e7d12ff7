"""Shared fixtures: every store test runs on a SQLite file and on PostgreSQL.

PostgreSQL tests need ``KISSBOT_TEST_POSTGRES_URL`` (``.ci/run`` sets it); each
test gets its own schema there, dropped afterwards. Without the variable they
skip with that reason (or fail, with ``KISSBOT_REQUIRE_POSTGRES=1``). With it, a
PostgreSQL test that skips for any reason fails instead, and the summary ends
with a line counting the PostgreSQL tests by outcome.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from kissbot import DatabaseManager

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "KISSBOT_TEST_POSTGRES_URL"
NO_POSTGRES = f"{POSTGRES_ENV} is not set: PostgreSQL tests need a server (.ci/run sets it)"


def postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("KISSBOT_REQUIRE_POSTGRES"):
            pytest.fail(NO_POSTGRES)
        pytest.skip(NO_POSTGRES)
    return url


def runs_on_postgresql(item: pytest.Item) -> bool:
    """True for a test that uses the PostgreSQL server (directly or as a backend parameter)."""
    callspec = getattr(item, "callspec", None)
    return "postgresql_url" in item.fixturenames or (callspec is not None and "postgresql" in callspec.params.values())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    report.postgresql = runs_on_postgresql(item)
    if report.skipped and isinstance(report.longrepr, tuple) and report.longrepr[2].endswith(NO_POSTGRES):
        # one summary line for all of them, not one per test
        report.longrepr = (__file__, postgres_base_url.__code__.co_firstlineno, report.longrepr[2])
    if report.postgresql and report.skipped and os.environ.get(POSTGRES_ENV):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"PostgreSQL test skipped although {POSTGRES_ENV} is set: {reason}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    outcomes: dict[str, str] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "postgresql", False) and (report.when == "call" or not report.passed):
                outcomes.setdefault(report.nodeid, "passed" if report.passed else report.outcome)
    if outcomes:
        counts = {o: sum(v == o for v in outcomes.values()) for o in ("passed", "skipped", "failed")}
        terminalreporter.write_line("PostgreSQL tests: " + ", ".join(f"{n} {o}" for o, n in counts.items()))


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A URL whose ``search_path`` is a fresh, empty schema on the test server."""
    base = make_url(postgres_base_url())
    schema = f"kb_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a (not yet created) SQLite file."""
    return f"sqlite:///{tmp_path / 'kissbot.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once per backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's KISSBOT_KEY / KISSBOT_KEY_FILE / KISSBOT_DB must not leak into tests."""
    monkeypatch.delenv("KISSBOT_KEY", raising=False)
    monkeypatch.delenv("KISSBOT_KEY_FILE", raising=False)
    monkeypatch.delenv("KISSBOT_DB", raising=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / ".kissbot.key"


@pytest.fixture
def mgr(store_url: str, key_file: Path) -> Iterator[DatabaseManager]:
    """A manager on a fresh store, on each backend."""
    with DatabaseManager(url=store_url, key_file=key_file) as manager:
        yield manager


@pytest.fixture
def bot(mgr: DatabaseManager) -> int:
    """The id of a bot user ``serda_bot``."""
    return mgr.create_user("1209350837", "serda_bot", display_name="Serda_Bot", is_bot=True)
pytest_plugins = ["pytester"]
