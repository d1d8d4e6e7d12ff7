"""Alembic owns the schema: the spec's tables from `alembic upgrade head`, round trips, no drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import inspect

from kissbot.engine import create_engine
from kissbot.errors import SchemaError, UnversionedDatabase
from kissbot.migrations import HEAD, alembic_config, current_revision, downgrade, ensure_schema, upgrade

REPO = Path(__file__).resolve().parent.parent

SPEC_COLUMNS = {
    "users": ["id", "twitch_user_id", "twitch_login", "display_name", "is_bot", "created_at", "updated_at"],
    "oauth_tokens": [
        "id", "user_id", "access_token_encrypted", "refresh_token_encrypted", "scopes", "expires_at",
        "needs_reauth", "refresh_failures", "created_at", "updated_at",
        # schema v2 (0002)
        "token_type", "status", "last_refresh", "last_validated", "version",
        "refresh_lease_owner", "refresh_lease_expires_at", "key_version",
    ],
    "instances": [
        "id", "channel_id", "bot_user_id", "status", "pid", "start_time", "stop_time", "last_heartbeat",
        "crash_count", "config_overrides", "created_at", "updated_at",
    ],
    "audit_log": ["id", "event_type", "user_id", "channel_id", "details", "severity", "timestamp"],
    "config": ["key", "value", "description", "updated_at"],
}
NOT_NULL = {
    "users": {"id", "twitch_user_id", "twitch_login"},
    "oauth_tokens": {
        "id", "user_id", "access_token_encrypted", "refresh_token_encrypted", "expires_at",
        "token_type", "status", "version", "key_version",
    },
    "instances": {"id", "channel_id", "bot_user_id", "status"},
    "audit_log": {"id", "event_type"},
    "config": {"key", "value"},
}
SPEC_INDEXES = {
    "oauth_tokens": {
        "idx_oauth_user": ["user_id"],
        "idx_oauth_expires": ["expires_at"],
        "uq_oauth_tokens_user_id_token_type": ["user_id", "token_type"],
        "idx_oauth_state": ["token_type", "needs_reauth", "key_version", "refresh_failures"],  # 0003, for metrics
        "idx_oauth_key_version": ["key_version"],  # 0004, opening a store probes it
    },
    "audit_log": {
        "idx_audit_timestamp": ["timestamp", "id"],  # 0005, a cleanup batch starts after a (timestamp, id)
        "idx_audit_event_type": ["event_type"],
        "idx_audit_user": ["user_id"],
    },
}
DEFAULTS = {
    "encryption_key_version": "1",
    "token_refresh_interval": "60",
    "health_check_interval": "30",
    "max_crash_count": "3",
    "log_retention_days": "30",
}


def alembic_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KISSBOT_DB_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def assert_spec_schema(url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        insp = inspect(conn)
        assert set(insp.get_table_names()) >= set(SPEC_COLUMNS)
        for table, columns in SPEC_COLUMNS.items():
            found = {c["name"]: c for c in insp.get_columns(table)}
            assert list(found) == columns, table
            assert {n for n, c in found.items() if not c["nullable"]} == NOT_NULL[table], table
        for table, indexes in SPEC_INDEXES.items():
            assert {i["name"]: i["column_names"] for i in insp.get_indexes(table)} == indexes
        assert {tuple(u["column_names"]) for u in insp.get_unique_constraints("users")} == {
            ("twitch_user_id",),
            ("twitch_login",),
        }
        (fk,) = insp.get_foreign_keys("oauth_tokens")
        assert (fk["name"], fk["referred_table"], fk["options"].get("ondelete")) == (
            "fk_oauth_tokens_user_id_users", "users", "CASCADE",
        )
        if engine.dialect.name == "postgresql":  # SQLite does not reflect inline primary key names
            assert insp.get_pk_constraint("users")["name"] == "pk_users"
        config = dict(conn.exec_driver_sql("SELECT key, value FROM config").all())
        assert config == DEFAULTS
        descriptions = conn.exec_driver_sql("SELECT count(*) FROM config WHERE description IS NOT NULL").scalar()
        assert descriptions == 5
    engine.dispose()


def test_alembic_cli_upgrade_downgrade_upgrade_check(store_url):
    for args in (["upgrade", "head"], ["check"], ["downgrade", "base"], ["upgrade", "head"], ["check"]):
        result = alembic_cli(store_url, *args)
        assert result.returncode == 0, (args, result.stderr)
    assert "No new upgrade operations detected" in result.stdout
    assert_spec_schema(store_url)


def test_alembic_cli_says_what_it_runs(sqlite_url):
    result = alembic_cli(sqlite_url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert "INFO  [alembic.runtime.migration] Running upgrade  -> 0001" in result.stderr
    assert "Running upgrade 0001 -> 0002" in result.stderr


def test_alembic_cli_sqlite_file_is_in_wal_mode(sqlite_url):
    """SQLite only: WAL is SQLite's journal mode."""
    assert alembic_cli(sqlite_url, "upgrade", "head").returncode == 0
    engine = sqlalchemy.create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_downgrade_base_removes_every_table(store_url):
    engine = create_engine(store_url)
    upgrade(engine)
    downgrade(engine, "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
        assert current_revision(conn) is None
    upgrade(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == HEAD
    engine.dispose()


def test_head_constant_matches_the_scripts():
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD


def test_ensure_schema_refuses_an_unversioned_sqlite_file_byte_for_byte(tmp_path):
    """SQLite only: the refused file must stay byte-identical (and not be switched to WAL)."""
    db = tmp_path / "v4.db"
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, twitch_login TEXT)")
    before = db.read_bytes()
    engine = create_engine(db)
    with pytest.raises(UnversionedDatabase, match="kissbot adopt"):
        ensure_schema(engine)
    engine.dispose()
    assert db.read_bytes() == before


def test_ensure_schema_refuses_an_unversioned_database_with_tables(store_url):
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, twitch_login TEXT)")
        conn.exec_driver_sql("INSERT INTO users VALUES (1, 'serda_bot')")
    with pytest.raises(UnversionedDatabase, match="kissbot adopt"):
        ensure_schema(engine)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"users"}
        assert conn.exec_driver_sql("SELECT twitch_login FROM users").all() == [("serda_bot",)]
    engine.dispose()


def test_ensure_schema_refuses_an_unknown_revision(store_url):
    engine = create_engine(store_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff'")
    with pytest.raises(SchemaError, match="ffff"):
        ensure_schema(engine)
    engine.dispose()


def test_concurrent_first_opens_migrate_once(store_url):
    """Four processes opening a new store at once all succeed on one schema."""
    code = (
        "import sys; from kissbot.engine import create_engine; from kissbot.migrations import ensure_schema;"
        "e = create_engine(sys.argv[1]); ensure_schema(e); e.dispose()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, store_url], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    engine = create_engine(store_url)
    with engine.connect() as conn:
        assert current_revision(conn) == HEAD
        assert conn.exec_driver_sql("SELECT count(*) FROM config").scalar() == 5
    engine.dispose()


def _store_two_types(url: str, key_file) -> int:
    from kissbot import DatabaseManager

    with DatabaseManager(url=url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, "bot-a", "bot-r", 60)
        mgr.store_tokens(uid, "bc-a", "bc-r", 60, token_type="broadcaster")
        return uid


def test_downgrade_below_v2_refuses_users_with_two_token_types(store_url, key_file):
    uid = _store_two_types(store_url, key_file)
    result = alembic_cli(store_url, "downgrade", "0001")
    assert result.returncode != 0
    assert f"FAILED: cannot downgrade below 0002: users {uid} hold both bot and broadcaster tokens" in result.stdout
    engine = create_engine(store_url)
    with engine.connect() as conn:
        assert current_revision(conn) == HEAD
        assert conn.exec_driver_sql("SELECT count(*) FROM oauth_tokens").scalar() == 2
    engine.dispose()


def test_v2_round_trip_keeps_token_data(store_url, key_file):
    from kissbot import DatabaseManager

    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, "access-1", "refresh-1", 3600, scopes=["chat:read"])
        mgr.mark_tokens_expired(uid)
        before = mgr.get_tokens(uid)
    engine = create_engine(store_url)
    downgrade(engine, "0001")
    upgrade(engine)
    engine.dispose()
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        after = mgr.get_tokens(uid)
    same = ("access_token", "refresh_token", "scopes", "expires_at", "needs_reauth", "refresh_failures")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    assert after["status"] == "expired", "status is derived from needs_reauth on upgrade"


def test_downgrade_below_v2_refuses_broadcaster_only_tokens(store_url, key_file):
    from kissbot import DatabaseManager

    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "el_serda")
        mgr.store_tokens(uid, "bc-a", "bc-r", 60, token_type="broadcaster")
    engine = create_engine(store_url)
    with pytest.raises(Exception, match=f"users {uid} hold broadcaster tokens, which the baseline schema would mistake"):
        downgrade(engine, "0001")
    with engine.connect() as conn:
        assert current_revision(conn) == HEAD
    engine.dispose()
