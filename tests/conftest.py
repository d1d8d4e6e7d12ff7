"""Shared fixtures: every store test runs on a SQLite file and on PostgreSQL.

PostgreSQL tests need ``KISSBOT_TEST_POSTGRES_URL`` (``.ci/run`` sets it); each
test gets its own schema there, dropped afterwards. Without the variable they
skip with that reason.
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
