"""SQLite transactions: reads BEGIN, writes BEGIN IMMEDIATE, whichever way they are opened."""

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


def test_reads_begin_deferred_and_writes_begin_immediate(tmp_path: Path):
    with DatabaseManager(tmp_path / "kissbot.db", tmp_path / ".kissbot.key") as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        statements: list[str] = []
        with mgr.engine.connect() as conn:  # the pool's one connection, used by every call below
            conn.connection.driver_connection.set_trace_callback(statements.append)
        mgr.store_tokens(bot, "access", "refresh", 3600)
        assert begins(statements) == ["BEGIN IMMEDIATE"]
        statements.clear()
        mgr.get_tokens(bot)
        mgr.get_user_by_login("serda_bot")
        assert begins(statements) == ["BEGIN", "BEGIN"]
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
            with write_transaction(engine):
                pass
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
