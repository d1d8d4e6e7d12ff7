"""PostgreSQL-only behaviour: column types, row locks that do not block, eight processes on one schema."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from kissbot import DatabaseManager
from kissbot.crypto import generate_key
from kissbot.models import oauth_tokens
from kissbot.repo import TokenRepository
from workers import mixed_operations, run_in_processes


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
            with pytest.raises(OperationalError, match="lock timeout"):
                third.execute(select(oauth_tokens.c.id).with_for_update()).all()
    assert [r["user_id"] for r in held] == ids[:3]
    assert [r["user_id"] for r in taken] == ids[3:]
    with pg.engine.connect() as conn:
        owners = dict(conn.execute(select(oauth_tokens.c.user_id, oauth_tokens.c.refresh_lease_owner)).all())
    assert owners == {**{uid: "first" for uid in ids[:3]}, **{uid: "second" for uid in ids[3:]}}


ITERATIONS = 30


def test_eight_processes_mixed_operations_on_one_schema(postgresql_url):
    key = generate_key()
    with DatabaseManager(url=postgresql_url, key=key) as mgr:
        mgr.create_user("100", "chan")
        bots = [mgr.create_user(str(200 + i), f"bot_{i}", is_bot=True) for i in range(8)]
        instances = [mgr.register_instance("chan", f"bot_{i}", 1000 + i) for i in range(8)]
        due = _due_users(mgr, 40)
    reports = run_in_processes(mixed_operations, postgresql_url, key, iterations=ITERATIONS)
    assert [errors for _, errors, _ in reports] == [[]] * 8
    claimed = [row for _, _, rows in reports for row in rows]
    assert len(claimed) == len(set(claimed)) and set(claimed) <= {(uid, "bot") for uid in due}
    with DatabaseManager(url=postgresql_url, key=key) as mgr:
        for i, uid in enumerate(bots):
            tokens = mgr.get_tokens(uid)
            assert (tokens["access_token"], tokens["version"]) == (f"access-{i}-{ITERATIONS - 1}", ITERATIONS)
        assert len(mgr.get_audit_log(limit=10_000, event_type="stress")) == 8 * ITERATIONS
        assert len(mgr.get_audit_log(limit=10_000, event_type="tokens_refreshed")) == 8 * (ITERATIONS - 1)
        assert {i["id"] for i in mgr.get_active_instances()} == set(instances)
        with mgr.engine.connect() as conn:
            leased = conn.execute(
                select(oauth_tokens.c.user_id, oauth_tokens.c.refresh_lease_owner).where(
                    oauth_tokens.c.refresh_lease_owner.is_not(None)
                )
            ).all()
    owner_of = {uid: f"w{index}" for index, _, rows in reports for uid, _ in rows}
    assert dict(leased) == owner_of
    assert len(claimed) == min(40, 8 * ITERATIONS)
