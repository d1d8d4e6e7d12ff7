"""Transactions: SQLite writes BEGIN IMMEDIATE, sessions BEGIN, and a manager's read is one statement and one round trip."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from kissbot import DatabaseManager
from kissbot.engine import create_engine, write_transaction, writer
from kissbot.errors import DatabaseBusy


def begins(statements: list[str]) -> list[str]:
    return [s for s in statements if s.startswith("BEGIN")]


def test_manager_reads_send_no_begin_and_writes_begin_immediate(tmp_path: Path):
    with DatabaseManager(tmp_path / "kissbot.db", tmp_path / ".kissbot.key") as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        statements: list[str] = []
        with mgr.engine.connect() as conn:  # the pool's one connection, used by every call below
            conn.connection.driver_connection.set_trace_callback(statements.append)
        mgr.store_tokens(bot, "access", "refresh", 3600)
        assert begins(statements) == ["BEGIN IMMEDIATE"]
        statements.clear()
        assert mgr.get_tokens(bot)["access_token"] == "access"
        assert mgr.get_user_by_login("serda_bot")["id"] == bot
        assert len(statements) == 2 and statements[0].startswith("SELECT") and statements[1].startswith("SELECT")
        statements.clear()
        with mgr.session() as session:
            session.execute(text("SELECT 1"))
        with writer(mgr.engine).begin() as conn:
            conn.execute(text("SELECT 1"))
        with write_transaction(mgr.engine) as conn:
            conn.execute(text("SELECT 1"))
        with Session(mgr.engine) as session:
            session.execute(text("SELECT 1"))
        assert begins(statements) == ["BEGIN IMMEDIATE"] * 3 + ["BEGIN"]


def test_a_held_write_lock_fails_writers_with_database_busy_not_readers(tmp_path: Path):
    path = tmp_path / "kissbot.db"
    DatabaseManager(path, tmp_path / ".kissbot.key").close()
    engine = create_engine(path, busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM users")).scalar_one() == 0
        with pytest.raises(DatabaseBusy, match="is locked"):
            with write_transaction(engine) as conn:
                conn.execute(text("UPDATE config SET value = value"))
        other.execute("ROLLBACK")
        statements: list[str] = []
        with engine.connect() as conn:  # the failed attempt left nothing behind
            conn.connection.driver_connection.set_trace_callback(statements.append)
            conn.execute(text("SELECT 1"))
        with write_transaction(engine) as conn:
            conn.execute(text("UPDATE config SET value = value"))
        assert begins(statements) == ["BEGIN", "BEGIN IMMEDIATE"]
    finally:
        other.close()
        engine.dispose()


def test_a_write_transaction_takes_the_lock_at_its_first_statement_not_before(tmp_path: Path):
    path = tmp_path / "kissbot.db"
    DatabaseManager(path, tmp_path / ".kissbot.key").close()
    engine = create_engine(path, busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    try:
        with write_transaction(engine) as conn:
            other.execute("BEGIN IMMEDIATE")  # free until the first statement
            other.execute("ROLLBACK")
            conn.execute(text("UPDATE config SET value = value"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # committed: free again
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_a_postgresql_read_through_the_manager_is_one_round_trip(postgresql_url, tmp_path: Path):
    from psycopg.pq import Trace

    with DatabaseManager(url=postgresql_url, key_file=tmp_path / ".kissbot.key") as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, "access", "refresh", 3600)
        with mgr.engine.connect() as conn:  # the pool's one connection, used by every call below
            pgconn = conn.connection.driver_connection.pgconn
        trace = tmp_path / "libpq.trace"
        with trace.open("w") as out:
            # libpq's own log of every protocol message: what really crosses the wire.
            pgconn.trace(out.fileno())
            pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            try:
                assert mgr.get_tokens(bot)["access_token"] == "access"
                assert mgr.get_user_by_login("serda_bot")["id"] == bot
            finally:
                pgconn.untrace()
        messages = trace.read_text().splitlines()
        sent = [m.split("\t")[2] for m in messages if m.startswith("F\t")]
        assert not [m for m in messages if "BEGIN" in m or "ROLLBACK" in m or "COMMIT" in m]
        assert sent.count("Sync") + sent.count("Query") == 2  # one exchange per read
        assert [m.split("\t")[2] for m in messages if m.startswith("B\t")].count("ReadyForQuery") == 2
