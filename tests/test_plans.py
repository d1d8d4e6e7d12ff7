"""The due scan, the due claim and the batched audit cleanup read through their indexes (issue 17 item 3).

Each test runs the repository's method on a store of a few thousand rows, records
the statements it really sent, and asks the database for their plans (``EXPLAIN``
on PostgreSQL, ``EXPLAIN QUERY PLAN`` on SQLite): no full scan of a table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, text

from kissbot import DatabaseManager
from kissbot.engine import write_transaction
from kissbot.models import audit_log, oauth_tokens, users
from kissbot.repo import AuditRepository, TokenRepository
from kissbot.types import utcnow

ROWS = 5000
DUE = 10


@pytest.fixture
def big(store_url: str, key_file) -> Iterator[DatabaseManager]:
    """A store of ROWS users with tokens (DUE of them due) and 4 x ROWS audit events (3 x ROWS old), analysed."""
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        now = utcnow()
        with write_transaction(mgr.engine) as conn:
            conn.execute(insert(users), [{"twitch_user_id": str(i), "twitch_login": f"u{i}", "created_at": now,
                                          "updated_at": now} for i in range(ROWS)])
            ids = conn.execute(text("SELECT id FROM users ORDER BY id")).scalars().all()
            conn.execute(insert(oauth_tokens), [
                {"user_id": uid, "access_token_encrypted": "a", "refresh_token_encrypted": "r",
                 "expires_at": now + timedelta(minutes=1 if n < DUE else 240 + n)}
                for n, uid in enumerate(ids)
            ])
            conn.execute(insert(audit_log), [
                {"event_type": "e", "timestamp": now - timedelta(days=100 if n < 3 * ROWS else 0, seconds=n)}
                for n in range(4 * ROWS)
            ])
        with mgr.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
        yield mgr


@contextmanager
def sent(mgr: DatabaseManager) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def record(_conn, _cursor, statement, parameters, _context, _many) -> None:
        statements.append((statement, parameters))

    event.listen(mgr.engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(mgr.engine, "before_cursor_execute", record)


def plan(mgr: DatabaseManager, statement: str, parameters: Any) -> str:
    explain = "EXPLAIN QUERY PLAN" if mgr.engine.dialect.name == "sqlite" else "EXPLAIN"
    with mgr.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"{explain} {statement}", parameters).all()
        conn.rollback()
    return "\n".join(str(row[-1]) for row in rows)


def plans_of(mgr: DatabaseManager, call: Callable[[Any], Any], table: str) -> list[tuple[str, str]]:
    """The statements on ``table`` that ``call(connection)`` sends (in a transaction rolled back), with their plans."""
    with sent(mgr) as statements, mgr.engine.connect() as conn:
        call(conn)
        conn.rollback()
    chosen = [(s, p) for s, p in statements if table in s and not s.startswith(("BEGIN", "SAVEPOINT"))]
    assert chosen
    return [(s, plan(mgr, s, p)) for s, p in chosen]


def no_full_scan(mgr: DatabaseManager, text_of_plan: str, index: str = "") -> None:
    assert index in text_of_plan, text_of_plan
    if mgr.engine.dialect.name == "sqlite":
        assert not [line for line in text_of_plan.splitlines() if line.startswith("SCAN ")], text_of_plan
    else:
        assert "Seq Scan" not in text_of_plan, text_of_plan


def test_due_scan_uses_the_expiry_index(big):
    ((_, due),) = plans_of(big, lambda conn: TokenRepository(conn).get_tokens_needing_refresh(10), "oauth_tokens")
    no_full_scan(big, due, "idx_oauth_expires")


def test_due_claim_uses_the_expiry_index(big):
    def claim(conn):
        assert len(TokenRepository(conn).claim_due("planner", 60, buffer_minutes=10)) == DUE

    statements = plans_of(big, claim, "oauth_tokens")
    for statement, claimed in statements:
        no_full_scan(big, claimed)
    assert [statement for statement, claimed in statements if "expires_at <=" in statement and "idx_oauth_expires" in claimed]


def test_batched_cleanup_walks_the_timestamp_index(big):
    cutoff = utcnow() - timedelta(days=30)
    after = None

    def batch(conn):
        nonlocal after
        deleted, after = AuditRepository(conn).delete_logs_before(cutoff, 500, after)
        assert deleted == 500

    for _ in range(2):  # the second batch starts where the first one ended
        for _statement, batch_plan in plans_of(big, batch, "audit_log"):
            no_full_scan(big, batch_plan, "idx_audit_timestamp")


def test_batches_delete_every_old_event_once_and_nothing_newer(big, monkeypatch):
    from kissbot import manager

    monkeypatch.setattr(manager, "CLEANUP_BATCH_SIZE", 1000)
    monkeypatch.setattr(manager, "CLEANUP_PAUSE_RATIO", 0)
    with sent(big) as statements:
        assert big.cleanup_old_logs(days=30) == 3 * ROWS
    deletes = [s for s, _ in statements if s.startswith("DELETE")]
    assert len(deletes) == 3 * ROWS // 1000 + 1
    with big.engine.connect() as conn:
        assert AuditRepository(conn).count() == ROWS


def test_batched_cleanup_of_events_sharing_a_timestamp_starts_each_batch_in_the_index(store_url, key_file):
    # Without (timestamp, id) in the index, PostgreSQL finds a batch's start by reading every event of that
    # timestamp again: batch after batch slower (400,000 events of one second: 12 s instead of 1 s).
    old = utcnow() - timedelta(days=100)
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        with write_transaction(mgr.engine) as conn:
            conn.execute(insert(audit_log), [{"event_type": "e", "timestamp": old} for _ in range(3 * ROWS)])
            conn.execute(insert(audit_log), [{"event_type": "e", "timestamp": utcnow()} for _ in range(ROWS)])
        with mgr.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
        with mgr.engine.connect() as conn:
            _, after = AuditRepository(conn).delete_logs_before(utcnow() - timedelta(days=30), 500)
            conn.commit()
        assert after is not None and after[0] == old

        def batch(conn):
            assert AuditRepository(conn).delete_logs_before(utcnow() - timedelta(days=30), 500, after)[0] == 500

        for _statement, batch_plan in plans_of(mgr, batch, "audit_log"):
            no_full_scan(mgr, batch_plan, "idx_audit_timestamp")
            if mgr.engine.dialect.name == "postgresql":
                rows = [line.split(":")[0].strip() for line in batch_plan.splitlines() if "ROW(" in line]
                assert "Index Cond" in rows and "Filter" not in rows, batch_plan


def test_sqlite_cleanup_batches_of_events_sharing_a_timestamp_cost_the_same_first_and_last(tmp_path, key_file):
    # SQLite bounds a (timestamp, id) range on timestamp alone: a DELETE bounded by the batch's last
    # (timestamp, id) walked every remaining event of that timestamp, batch after batch (1,000,000
    # events of one timestamp: 52 s instead of 5 s, and a concurrent writer waiting 330 ms).
    old = utcnow() - timedelta(days=100)
    with DatabaseManager(tmp_path / "kb.db", key_file) as mgr:
        with write_transaction(mgr.engine) as conn:
            conn.execute(insert(audit_log), [{"event_type": "e", "timestamp": old} for _ in range(3 * ROWS)])
        steps, after = [], None
        with mgr.engine.connect() as conn:
            counted = [0]

            def count() -> int:
                counted[0] += 1
                return 0

            conn.connection.driver_connection.set_progress_handler(count, 1000)
            try:
                while True:
                    counted[0] = 0
                    deleted, after = AuditRepository(conn).delete_logs_before(utcnow() - timedelta(days=30), 500, after)
                    steps.append(counted[0])
                    if after is None:
                        break
            finally:
                conn.connection.driver_connection.set_progress_handler(None, 0)
            conn.commit()
            assert AuditRepository(conn).count() == 0
    assert len(steps) == 3 * ROWS // 500 + 1
    # VM steps of each batch (the last one deletes nothing): the same, not shrinking with the events left
    # (before: 291 steps for the second batch, 34 for the last full one).
    assert max(steps[:-1]) <= 2 * min(steps[1:-1]), steps
