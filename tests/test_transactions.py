"""Transactions: SQLite writes BEGIN IMMEDIATE, sessions BEGIN, and a manager's read is one statement and one round trip."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, event, text
from sqlalchemy.orm import Session

from kissbot import DatabaseManager
from kissbot.engine import create_engine, write_transaction, writer
from kissbot.errors import DatabaseBusy, DecryptionError, StaleTokens
from kissbot.urls import sqlite_path


def begins(statements: list[str]) -> list[str]:
    return [s for s in statements if s.startswith("BEGIN")]


def traced_sqlite(mgr: DatabaseManager) -> list[str]:
    """Every statement SQLite runs on the connections ``mgr`` opens from now on."""
    statements: list[str] = []
    mgr.close()  # the calls below open new connections, traced from the start
    event.listen(mgr.engine, "connect", lambda dbapi_conn, _record: dbapi_conn.set_trace_callback(statements.append))
    return statements


def test_manager_reads_send_no_begin_and_writes_begin_immediate(tmp_path: Path):
    with DatabaseManager(tmp_path / "kissbot.db", tmp_path / ".kissbot.key") as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        statements = traced_sqlite(mgr)
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
        mgr.close()  # the reads below open a new connection, traced from the start
        trace, pgconns = tmp_path / "libpq.trace", []
        with trace.open("w") as out:

            def start_trace(dbapi_conn, _record) -> None:
                # libpq's own log of every protocol message: what really crosses the wire.
                dbapi_conn.pgconn.trace(out.fileno())
                dbapi_conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
                pgconns.append(dbapi_conn.pgconn)

            event.listen(mgr.engine, "connect", start_trace)
            try:
                assert mgr.get_tokens(bot)["access_token"] == "access"
                assert mgr.get_user_by_login("serda_bot")["id"] == bot
            finally:
                for pgconn in pgconns:
                    pgconn.untrace()
        messages = trace.read_text().splitlines()
        sent = [m.split("\t")[2] for m in messages if m.startswith("F\t")]
        assert len(pgconns) == 1
        assert not [m for m in messages if "BEGIN" in m or "ROLLBACK" in m or "COMMIT" in m]
        assert sent.count("Sync") + sent.count("Query") == 2  # one exchange per read
        assert [m.split("\t")[2] for m in messages if m.startswith("B\t")].count("ReadyForQuery") == 2


def _sessions_in_transaction(mgr: DatabaseManager, connections: list[Any]) -> list[str]:
    if mgr.engine.dialect.name == "sqlite":
        # A checkpoint that truncates the WAL needs every reader and writer of the file gone.
        other = sqlite3.connect(sqlite_path(mgr.url), isolation_level=None, timeout=0.05)
        try:
            busy, log, done = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            other.close()
        return [f"checkpoint blocked: {busy}, {log} frames, {done} copied"] if busy or log != done else []
    with mgr.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT pid, state FROM pg_stat_activity WHERE pid IN :pids AND pid <> pg_backend_pid() AND state <> 'idle'").bindparams(
                bindparam("pids", expanding=True)
            ),
            {"pids": [c.info.backend_pid for c in connections]},
        ).all()
    return [f"{pid}: {state}" for pid, state in rows]


def test_between_calls_a_manager_holds_no_transaction_or_snapshot(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.close()
        opened: list[Any] = []  # the DBAPI connections opened from now on
        event.listen(mgr.engine, "connect", lambda dbapi_conn, _record: opened.append(dbapi_conn))
        mgr.store_tokens(bot, "access", "refresh", 3600)
        assert mgr.get_tokens(bot)["access_token"] == "access"
        assert mgr.get_user_by_login("serda_bot")["id"] == bot
        mgr.store_tokens(bot, "access", "refresh", 3600)
        assert mgr.get_tokens(bot)["access_token"] == "access"
        assert len(opened) == 1  # one connection for all the calls, kept between them
        assert _sessions_in_transaction(mgr, opened) == []
        with pytest.raises(StaleTokens):
            mgr.store_tokens(bot, "access-2", "refresh-2", 3600, expected_version=7)
        with mgr.engine.begin() as conn:  # a row that no longer decrypts
            conn.execute(text("UPDATE oauth_tokens SET access_token_encrypted = 'gAAAAAbroken'"))
        with pytest.raises(DecryptionError):
            mgr.get_tokens(bot)
        assert _sessions_in_transaction(mgr, opened) == []
        mgr.store_tokens(bot, "access-3", "refresh-3", 3600)  # the failed calls left nothing in the way
        assert mgr.get_tokens(bot)["access_token"] == "access-3"
        assert _sessions_in_transaction(mgr, opened) == []
        assert mgr.engine.pool.checkedout() > 0
        mgr.close()
        assert mgr.engine.pool.checkedout() == 0


def test_threads_sharing_a_manager_neither_wait_for_each_other_nor_exhaust_the_pool(store_url, key_file):
    threads, rounds = 40, 10  # more threads than the pool's 5 connections and 10 of overflow
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        users = [mgr.create_user(str(i), f"user{i}") for i in range(threads)]

        def work(uid: int) -> str:
            for i in range(rounds):
                mgr.store_tokens(uid, f"access-{uid}-{i}", f"refresh-{uid}-{i}", 3600)
                assert mgr.get_tokens(uid)["access_token"] == f"access-{uid}-{i}"
            return mgr.get_tokens(uid)["refresh_token"]

        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(work, users, timeout=120))
        assert done == [f"refresh-{uid}-{rounds - 1}" for uid in users]
        assert mgr.engine.pool.checkedout() <= 1  # the manager's own, whatever the threads did
