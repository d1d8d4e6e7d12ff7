"""Hostile databases: `restore`, `adopt` and `doctor` compare a database with the schema its migration defines.

Each hostile database is a real kissbot backup edited with sqlite3 the way an attacker (or a bad hand edit)
would: a trigger, a lying migration stamp, a dropped or renamed column, config values that leave the store
unopenable, a token stored as a BLOB. Restoring or adopting it is refused with one line naming the
difference, and the live store is byte-identical afterwards (sha256 of every file of its folder).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from kissbot import DatabaseManager
from kissbot.backup import backup_sqlite
from kissbot.cli import cli
from kissbot.migrations import HEAD

from test_cli_ops import runner, store  # noqa: F401  (fixtures: a CliRunner; alice and bob with tokens)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def edit(db: Path, script: str) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(script)
        conn.commit()


HOSTILE = {
    "delete-trigger": (
        "CREATE TRIGGER wipe AFTER UPDATE ON oauth_tokens BEGIN DELETE FROM oauth_tokens WHERE id != NEW.id; END;",
        f"trigger wipe on oauth_tokens is not part of migration {HEAD}",
    ),
    "revert-trigger": (
        "CREATE TRIGGER keep_old AFTER UPDATE OF refresh_token_encrypted ON oauth_tokens BEGIN "
        "UPDATE oauth_tokens SET refresh_token_encrypted = OLD.refresh_token_encrypted WHERE id = NEW.id; END;",
        f"trigger keep_old on oauth_tokens is not part of migration {HEAD}",
    ),
    "leak-trigger": (
        "CREATE TRIGGER leak AFTER UPDATE ON oauth_tokens BEGIN "
        "INSERT INTO audit_log (event_type, details) VALUES ('x', NEW.refresh_token_encrypted); END;",
        f"trigger leak on oauth_tokens is not part of migration {HEAD}",
    ),
    "view": ("CREATE VIEW plain AS SELECT * FROM oauth_tokens;", f"view plain is not part of migration {HEAD}"),
    "extra-table": ("CREATE TABLE stash (v TEXT);", f"table stash is not part of migration {HEAD}"),
    "0001-stamped-on-0002": (
        "UPDATE alembic_version SET version_num = '0001';",
        "index idx_oauth_key_version on oauth_tokens is not part of migration 0001",
    ),
    "dropped-key-version": (
        # SQLite drops no indexed column: its indexes go first, and are reported first.
        "DROP INDEX idx_oauth_state; DROP INDEX idx_oauth_key_version; ALTER TABLE oauth_tokens DROP COLUMN key_version;",
        f"index idx_oauth_key_version on oauth_tokens of migration {HEAD} is missing",
    ),
    "renamed-column": (
        "PRAGMA writable_schema = ON; "
        "UPDATE sqlite_master SET sql = replace(sql, 'scopes', 'scopez') WHERE name = 'oauth_tokens'; "
        "PRAGMA writable_schema = OFF;",
        f"column oauth_tokens.scopes of migration {HEAD} is missing",
    ),
    "key-version-abc": (
        "UPDATE config SET value = 'abc' WHERE key = 'encryption_key_version';",
        "config encryption_key_version is 'abc', not an integer from 1 to 2147483647",
    ),
    "max-crash-nan": (
        "UPDATE config SET value = 'NaN' WHERE key = 'max_crash_count';",
        "config max_crash_count is 'NaN', not an integer from 1 to 1000",
    ),
    "blob-token": (
        "UPDATE oauth_tokens SET access_token_encrypted = CAST(access_token_encrypted AS BLOB);",
        "oauth_tokens.access_token_encrypted holds blob in 2 row(s), kissbot stores text",
    ),
    "real-key-version": (
        "UPDATE oauth_tokens SET key_version = 1e20;",
        "oauth_tokens.key_version holds real in 2 row(s), kissbot stores integer",
    ),
    # Same index names and columns, different meaning: ON CONFLICT finds no unique index, lookups no usable one.
    "partial-unique-index": (
        "DROP INDEX uq_oauth_tokens_user_id_token_type; "
        "CREATE UNIQUE INDEX uq_oauth_tokens_user_id_token_type ON oauth_tokens (user_id, token_type) WHERE user_id < 0;",
        "index uq_oauth_tokens_user_id_token_type on oauth_tokens is (user_id, token_type) with a WHERE clause, "
        f"migration {HEAD} defines (user_id, token_type)",
    ),
    "nocase-unique-index": (
        "DROP INDEX uq_oauth_tokens_user_id_token_type; "
        "CREATE UNIQUE INDEX uq_oauth_tokens_user_id_token_type ON oauth_tokens (user_id, token_type COLLATE NOCASE);",
        "index uq_oauth_tokens_user_id_token_type on oauth_tokens is (user_id, token_type COLLATE NOCASE), "
        f"migration {HEAD} defines (user_id, token_type)",
    ),
    "expression-index": (
        "DROP INDEX idx_oauth_user; CREATE INDEX idx_oauth_user ON oauth_tokens (user_id + 0);",
        f"index idx_oauth_user on oauth_tokens is (an expression), migration {HEAD} defines (user_id)",
    ),
    # The next user would find no id: every later `user add` fails with "database or disk is full".
    "exhausted-ids": (
        "UPDATE sqlite_sequence SET seq = 9223372036854775807 WHERE name = 'users';",
        "sqlite_sequence holds '9223372036854775807' for 'users', not an id counter from 0 to 9007199254740992",
    ),
}


def hostile_copy(db: Path, folder: Path, kind: str) -> Path:
    bad = backup_sqlite(db, folder / f"{kind}.backup")
    edit(bad, HOSTILE[kind][0])
    return bad


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_restore_refuses_a_hostile_backup_and_the_live_store_is_unchanged(runner, store, tmp_path, kind):
    db, key = store
    bad = hostile_copy(db, tmp_path, kind)
    before, bad_bytes = digest(db.parent), bad.read_bytes()
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(bad)])
    assert result.exit_code == 1, result.output
    first = HOSTILE[kind][1]
    assert re.fullmatch(
        rf"Error: {re.escape(f'{bad} is not a database kissbot made: {first}')}( \(and \d+ more\))?; nothing restored\n",
        result.output,
    ), result.output
    assert digest(db.parent) == before, "the live store is byte-identical"
    assert bad.read_bytes() == bad_bytes
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_restore_refuses_a_backup_whose_recorded_fingerprint_the_key_does_not_match(runner, store, tmp_path):
    db, key = store
    bad = backup_sqlite(db, tmp_path / "fingerprint.backup")
    edit(bad, "UPDATE config SET value = '0123456789abcdef' WHERE key = 'key_fingerprint_v1';")
    before = digest(db.parent)
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(bad)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: the current key does not match {bad}: key version 1 has fingerprint ")
    assert "but the store recorded 0123456789abcdef" in result.output and result.output.endswith("; nothing restored\n")
    assert len(result.output.splitlines()) == 1
    assert digest(db.parent) == before


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_adopt_refuses_a_hostile_database_and_changes_nothing(runner, store, tmp_path, kind):
    db, key = store
    folder = tmp_path / "adopt"
    folder.mkdir()
    target = folder / "kissbot.db"
    shutil.move(hostile_copy(db, tmp_path, kind), target)
    shutil.copy(key, folder / ".kissbot.key")
    before = digest(folder)
    result = runner.invoke(cli, ["adopt", "--db", str(target), "--key-file", str(folder / ".kissbot.key")])
    assert result.exit_code == 1, result.output
    revision = "0001" if kind == "0001-stamped-on-0002" else HEAD
    first = HOSTILE[kind][1]
    assert re.fullmatch(
        rf"Error: {re.escape(f'{target} says it is at migration {revision} but is not a database kissbot made: {first}')}"
        r"( \(and \d+ more\))?; nothing was changed\n",
        result.output,
    ), result.output
    assert digest(folder) == before, "no backup, no WAL conversion, nothing written"


# A live store's corrupt config values are findings of their own (tests/test_settings.py).
@pytest.mark.parametrize("kind", ["delete-trigger", "renamed-column", "blob-token", "expression-index", "exhausted-ids"])
def test_doctor_reports_a_hostile_live_store(runner, store, kind):
    db, key = store
    edit(db, HOSTILE[kind][0])
    before = digest(db.parent)
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("[error]")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"[error] {db} is not a database kissbot made: {HOSTILE[kind][1]}"), result.output
    assert "access-" not in result.output
    assert digest(db.parent) == before


def test_doctor_finds_a_healthy_store_exact(runner, store):
    db, key = store
    edit(db, "ANALYZE;")  # SQLite's statistics (kissbot maintenance analyze) are not a difference
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 0, result.output
    assert f"[ok] schema: exactly migration {HEAD}'s tables, columns and indexes; rows well-typed\n" in result.output


PG_HOSTILE = {
    "delete-trigger": (
        "CREATE FUNCTION wipe() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN DELETE FROM oauth_tokens WHERE id <> NEW.id; RETURN NEW; END $$; "
        "CREATE TRIGGER wipe AFTER UPDATE ON oauth_tokens FOR EACH ROW EXECUTE FUNCTION wipe()",
        "trigger wipe on oauth_tokens is not part of migration {head}",
    ),
    "view": ("CREATE VIEW plain AS SELECT * FROM oauth_tokens", "view plain is not part of migration {head}"),
    "dropped-key-version": (  # PostgreSQL drops the column's indexes with it, reported first
        "ALTER TABLE oauth_tokens DROP COLUMN key_version",
        "index idx_oauth_key_version on oauth_tokens of migration {head} is missing",
    ),
    "retyped-column": (
        "ALTER TABLE oauth_tokens ALTER COLUMN key_version TYPE text",
        "column oauth_tokens.key_version has type TEXT, migration {head} defines INTEGER",
    ),
    "key-version-abc": (
        "UPDATE config SET value = 'abc' WHERE key = 'encryption_key_version'",
        "config encryption_key_version holds 'abc', not an integer from 1 to 2147483647",
    ),
}


@pytest.mark.parametrize("kind", sorted(PG_HOSTILE))
def test_doctor_reports_a_hostile_postgresql_store(runner, postgresql_url, key_file, kind):
    import sqlalchemy
    from sqlalchemy.engine import make_url

    with DatabaseManager(url=postgresql_url, key_file=key_file) as mgr:
        mgr.store_tokens(mgr.create_user("1", "alice"), "access-alice", "refresh-alice", 60)
    healthy = runner.invoke(cli, ["doctor", "--url", postgresql_url, "--key-file", str(key_file)])
    assert healthy.exit_code == 0, healthy.output
    assert f"[ok] schema: exactly migration {HEAD}'s tables, columns and indexes; rows well-typed\n" in healthy.output
    engine = sqlalchemy.create_engine(postgresql_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(PG_HOSTILE[kind][0])
    finally:
        engine.dispose()
    result = runner.invoke(cli, ["doctor", "--url", postgresql_url, "--key-file", str(key_file)])
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("[error]")]
    shown = make_url(postgresql_url).render_as_string(hide_password=True)
    expected = PG_HOSTILE[kind][1].format(head=HEAD)
    if not expected.startswith("config "):  # a corrupt config value is a finding of its own
        expected = f"{shown} is not a database kissbot made: {expected}"
    assert line.startswith(f"[error] {expected}"), line
