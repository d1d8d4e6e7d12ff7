"""PostgreSQL-only behaviour: column types, row locks that do not block.

The eight-process tests (tests/test_concurrency.py, tests/test_claim_due.py) run on both backends.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select
from psycopg import OperationalError

from kissbot import DatabaseManager
from kissbot.errors import DatabaseBusy
from kissbot.models import oauth_tokens
from kissbot.repo import TokenRepository


@pytest.fixture
def pg(postgresql_url, key_file):
    with DatabaseManager(url=postgresql_url, key_file=key_file) as manager:
        yield manager


def test_timestamps_are_timestamptz_and_flags_are_booleans(pg):
    with pg.engine.connect() as conn:
        types = dict(
            conn.exec_driver_sql(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND data_type IN ('timestamp with time zone', "
                "'timestamp without time zone', 'boolean')"
            ).all()
        )
    assert set(types.values()) == {"timestamp with time zone", "boolean"}
    assert {c for c, t in types.items() if t == "boolean"} == {"users.is_bot", "oauth_tokens.needs_reauth"}
    assert "oauth_tokens.refresh_lease_expires_at" in types and "audit_log.timestamp" in types


def _due_users(mgr, count):
    ids = []
    for n in range(count):
        uid = mgr.create_user(str(n + 1), f"user_{n}")
        mgr.store_tokens(uid, f"a{n}", f"r{n}", 60 + n)
        ids.append(uid)
    return ids


def test_claim_due_skips_rows_another_worker_holds_without_waiting(pg):
    ids = _due_users(pg, 6)
    with pg.engine.connect() as first, first.begin():
        held = TokenRepository(first).claim_due("first", ttl=60, limit=3)  # row locks held until commit
        with pg.engine.connect() as second, second.begin():
            second.exec_driver_sql("SET LOCAL lock_timeout = '200ms'")  # a wait for a lock would fail
            taken = TokenRepository(second).claim_due("second", ttl=60)
        with pg.engine.connect() as third, third.begin():  # the control: a plain FOR UPDATE does wait
            third.exec_driver_sql("SET LOCAL lock_timeout = '200ms'")
            with pytest.raises(DatabaseBusy, match="is busy: another session held a lock") as waited:
                third.execute(select(oauth_tokens.c.id).with_for_update()).all()
            assert isinstance(waited.value.__cause__, OperationalError)
    assert [r["user_id"] for r in held] == ids[:3]
    assert [r["user_id"] for r in taken] == ids[3:]
    with pg.engine.connect() as conn:
        owners = dict(conn.execute(select(oauth_tokens.c.user_id, oauth_tokens.c.refresh_lease_owner)).all())
    assert owners == {**{uid: "first" for uid in ids[:3]}, **{uid: "second" for uid in ids[3:]}}
