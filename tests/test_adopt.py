"""`kissbot adopt`: databases that KissBot v4 built from the spec's DDL, adopted through the real CLI."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
from contextlib import closing
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.migrations import HEAD

REPO = Path(__file__).resolve().parent.parent

# The CREATE TABLE statements of DATABASE_ARCHITECTURE.md, verbatim, and the indexes it names.
SPEC_DDL = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    twitch_user_id TEXT NOT NULL UNIQUE,  -- ID Twitch (ex: "1209350837")
    twitch_login TEXT NOT NULL UNIQUE,     -- Login (ex: "serda_bot")
    display_name TEXT,                     -- Nom affiché (ex: "Serda_Bot")
    is_bot BOOLEAN DEFAULT 0,              -- Flag bot
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE oauth_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    access_token_encrypted TEXT NOT NULL,   -- Token chiffré Fernet
    refresh_token_encrypted TEXT NOT NULL,  -- Refresh token chiffré
    scopes TEXT,                            -- JSON array des scopes
    expires_at TIMESTAMP NOT NULL,          -- Date d'expiration
    needs_reauth BOOLEAN DEFAULT 0,         -- Flag réautorisation nécessaire
    refresh_failures INTEGER DEFAULT 0,     -- Compteur échecs refresh
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
);
CREATE TABLE instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id INTEGER NOT NULL,           -- user_id du channel
    bot_user_id INTEGER NOT NULL,          -- user_id du bot
    status TEXT NOT NULL DEFAULT 'stopped', -- running, stopped, crashed
    pid INTEGER,                           -- PID du processus
    start_time TIMESTAMP,
    stop_time TIMESTAMP,
    last_heartbeat TIMESTAMP,
    crash_count INTEGER DEFAULT 0,
    config_overrides TEXT,                 -- JSON overrides
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (channel_id) REFERENCES users(id),
    FOREIGN KEY (bot_user_id) REFERENCES users(id)
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL,              -- user_created, tokens_refreshed, etc.
    user_id INTEGER,
    channel_id INTEGER,
    details TEXT,                          -- JSON avec détails
    severity TEXT DEFAULT 'info',          -- info, warning, error
    timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (user_id) REFERENCES users(id),
    FOREIGN KEY (channel_id) REFERENCES users(id)
);
CREATE TABLE config (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    description TEXT,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX idx_oauth_user ON oauth_tokens(user_id);
CREATE INDEX idx_oauth_expires ON oauth_tokens(expires_at);
CREATE INDEX idx_audit_timestamp ON audit_log(timestamp);
CREATE INDEX idx_audit_event_type ON audit_log(event_type);
CREATE INDEX idx_audit_user ON audit_log(user_id);
"""

# What deployments ran instead: login not unique, display_name required, no stop_time,
# updated_at triggers and extra indexes.
VARIANT_DDL = (
    SPEC_DDL.replace("twitch_login TEXT NOT NULL UNIQUE", "twitch_login TEXT NOT NULL")
    .replace("display_name TEXT,", "display_name TEXT NOT NULL,")
    .replace("    stop_time TIMESTAMP,\n", "")
    + """
CREATE INDEX idx_users_login ON users(twitch_login);
CREATE INDEX idx_instances_status ON instances(status);
CREATE TRIGGER update_users_timestamp AFTER UPDATE ON users
BEGIN UPDATE users SET updated_at = CURRENT_TIMESTAMP WHERE id = NEW.id; END;
CREATE TRIGGER update_oauth_tokens_timestamp AFTER UPDATE ON oauth_tokens
BEGIN UPDATE oauth_tokens SET updated_at = CURRENT_TIMESTAMP WHERE id = NEW.id; END;
"""
)

WINTER = "2025-11-05 00:46:08"  # Paris is UTC+1
SUMMER = "2025-07-14 12:30:00"  # Paris is UTC+2
WINTER_UTC = datetime(2025, 11, 4, 23, 46, 8, tzinfo=timezone.utc)
SUMMER_UTC = datetime(2025, 7, 14, 10, 30, tzinfo=timezone.utc)
TOKENS = {1: ("yrxyuiyffxiqsbc6cpr5y7utl7xmtd", "refresh-serda-bot"), 2: ("access-el-serda", "refresh-el-serda")}
TABLES = ("users", "oauth_tokens", "instances", "audit_log", "config")


def wrap(key: bytes, token: str) -> str:
    """KissBot v4's stored form: a Fernet token, base64-wrapped once more."""
    return base64.urlsafe_b64encode(Fernet(key).encrypt(token.encode())).decode()


def build_v4(db: Path, key: bytes, ddl: str = SPEC_DDL) -> None:
    """A database as KissBot v4 left it: wrapped ciphertext, local naive times, a running instance.

    Deployment variants ran in WAL mode, as the spec asks.
    """
    conn = sqlite3.connect(db)
    if ddl is VARIANT_DDL:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(ddl)
    conn.executemany(
        "INSERT INTO users (id, twitch_user_id, twitch_login, display_name, is_bot, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (1, "1209350837", "serda_bot", "Serda_Bot", 1, WINTER, WINTER),
            (2, "44322889", "El_Serda", "El_Serda", 0, SUMMER, WINTER),
            (3, "555555", "morthy", "Morthy", 0, SUMMER, SUMMER),
        ],
    )
    conn.executemany(
        "INSERT INTO oauth_tokens (user_id, access_token_encrypted, refresh_token_encrypted, scopes, expires_at,"
        " needs_reauth, refresh_failures, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (1, wrap(key, TOKENS[1][0]), wrap(key, TOKENS[1][1]), '["chat:read", "chat:edit"]', WINTER, 0, 0, SUMMER, WINTER),
            (2, wrap(key, TOKENS[2][0]), wrap(key, TOKENS[2][1]), '["channel:read:subscriptions"]', SUMMER, 1, 3, SUMMER, SUMMER),
        ],
    )
    conn.execute(
        "INSERT INTO instances (channel_id, bot_user_id, status, pid, start_time, last_heartbeat, crash_count,"
        " created_at, updated_at) VALUES (2, 1, 'running', 4242, ?, ?, 1, ?, ?)",
        (SUMMER, WINTER, SUMMER, WINTER),
    )
    conn.executemany(
        "INSERT INTO audit_log (event_type, user_id, channel_id, details, severity, timestamp) VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("user_created", 1, None, json.dumps({"login": "serda_bot", "is_bot": True}), "info", SUMMER),
            ("tokens_refreshed", 1, None, json.dumps({"expires_in": 14400}), "info", WINTER),
            ("instance_started", 1, 2, json.dumps({"pid": 4242}), "info", WINTER),
            ("scratch", None, None, None, "info", WINTER),
        ],
    )
    conn.execute("DELETE FROM audit_log WHERE event_type = 'scratch'")  # sqlite_sequence stays at 4
    conn.executemany(
        "INSERT INTO config (key, value, description, updated_at) VALUES (?, ?, ?, ?)",
        [
            ("encryption_key_version", "1", "Version de la clé Fernet", WINTER),
            ("token_refresh_interval", "60", "Secondes avant expiration", WINTER),
            ("health_check_interval", "30", "Secondes entre checks", WINTER),
            ("max_crash_count", "3", "Crashes avant désactivation", WINTER),
            ("log_retention_days", "30", "Rétention des audit logs", WINTER),
        ],
    )
    conn.commit()
    conn.close()


def counts(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def v4(tmp_path):
    """A spec-DDL KissBot v4 database and its key file, alone in their folder."""
    folder = tmp_path / "bot"
    folder.mkdir()
    key = Fernet.generate_key()
    key_file = folder / ".kissbot.key"
    key_file.write_bytes(key + b"\n")
    key_file.chmod(0o600)
    db = folder / "kissbot.db"
    build_v4(db, key)
    return db, key_file


def run_adopt(runner, db: Path, key_file: Path, *extra: str):
    return runner.invoke(
        cli, ["adopt", "--db", str(db), "--key-file", str(key_file), "--assume-tz", "Europe/Paris", *extra]
    )


def assert_adopted(db: Path, key_file: Path, before_counts: dict[str, int]) -> None:
    assert counts(db) == before_counts
    with closing(sqlite3.connect(db)) as conn:
        stored = conn.execute("SELECT access_token_encrypted, refresh_token_encrypted FROM oauth_tokens").fetchall()
        assert all(v.startswith("gAAAAA") for row in stored for v in row), "tokens are standard Fernet"
    with DatabaseManager(db, key_file) as mgr:
        for user_id, (access, refresh) in TOKENS.items():
            tokens = mgr.get_tokens(user_id)
            assert (tokens["access_token"], tokens["refresh_token"]) == (access, refresh)
        bot, channel = mgr.get_tokens(1), mgr.get_tokens(2)
        assert (bot["expires_at"], bot["created_at"], bot["updated_at"]) == (WINTER_UTC, SUMMER_UTC, WINTER_UTC)
        assert bot["scopes"] == ["chat:read", "chat:edit"]
        assert (channel["expires_at"], channel["needs_reauth"], channel["status"]) == (SUMMER_UTC, True, "expired")
        assert channel["refresh_failures"] == 3
        users = {u["id"]: u for u in mgr.list_users()}
        assert [users[i]["twitch_login"] for i in (1, 2, 3)] == ["serda_bot", "el_serda", "morthy"]
        assert mgr.get_user_by_login("El_Serda")["id"] == 2
        assert (users[2]["created_at"], users[2]["updated_at"]) == (SUMMER_UTC, WINTER_UTC)
        (instance,) = mgr.list_instances()  # not active: its last heartbeat is months old
        assert (instance["pid"], instance["start_time"], instance["last_heartbeat"]) == (4242, SUMMER_UTC, WINTER_UTC)
        log = mgr.get_audit_log()
        assert [(e["event_type"], e["timestamp"], e["details"]) for e in log] == [
            ("instance_started", WINTER_UTC, {"pid": 4242}),
            ("tokens_refreshed", WINTER_UTC, {"expires_in": 14400}),
            ("user_created", SUMMER_UTC, {"login": "serda_bot", "is_bot": True}),
        ]
        assert mgr.get_config("max_crash_count") == 3
        mgr.log_event("after_adoption")
        assert mgr.get_audit_log(limit=1)[0]["id"] == 5, "AUTOINCREMENT keeps counting from v4's sequence"
        mgr.store_tokens(1, "new-broadcaster", "r", 60, token_type="broadcaster")
        assert mgr.get_tokens(1, token_type="broadcaster")["access_token"] == "new-broadcaster"
    env = {**os.environ, "KISSBOT_DB_URL": f"sqlite:///{db}"}
    check = subprocess.run(
        [sys.executable, "-m", "alembic", "check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout


@pytest.mark.parametrize("ddl", [SPEC_DDL, VARIANT_DDL], ids=["spec", "variant-wal"])
def test_adopt_converts_everything_and_keeps_every_row(runner, tmp_path, ddl):
    folder = tmp_path / "bot"
    folder.mkdir()
    key = Fernet.generate_key()
    key_file = folder / ".kissbot.key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    db = folder / "kissbot.db"
    build_v4(db, key, ddl)
    with closing(sqlite3.connect(db)) as conn:
        original_dump = list(conn.iterdump())
    before = counts(db)

    result = run_adopt(runner, db, key_file)
    assert result.exit_code == 0, result.output
    assert "  24 timestamps: naive local time in Europe/Paris -> UTC\n" in result.output
    assert "  4 token values: base64-wrapped Fernet -> standard Fernet\n" in result.output
    assert "  1 logins lowercased\n" in result.output
    assert_adopted(db, key_file, before)

    (backup,) = folder.glob("kissbot.db.backup_*")
    assert f"Backup: {backup}\n" in result.output
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with closing(sqlite3.connect(backup)) as conn:
        assert list(conn.iterdump()) == original_dump, "the backup is the database as it was"


def test_adopt_report_of_the_spec_ddl_is_exact(runner, v4):
    db, key_file = v4
    before = snapshot(db.parent)
    result = run_adopt(runner, db, key_file, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"Database: {db} (KissBot v4, no migration version)\n"
        "Differences from kissbot's baseline schema (0001):\n"
        "  users.{created_at, updated_at}: type TIMESTAMP (baseline: DATETIME)\n"
        "  oauth_tokens.{expires_at, created_at, updated_at}: type TIMESTAMP (baseline: DATETIME)\n"
        "  index idx_oauth_user on oauth_tokens: (user_id) (baseline: unique (user_id))\n"
        "  instances.{start_time, stop_time, last_heartbeat, created_at, updated_at}: type TIMESTAMP (baseline: DATETIME)\n"
        "  audit_log.timestamp: type TIMESTAMP (baseline: DATETIME)\n"
        "  config.updated_at: type TIMESTAMP (baseline: DATETIME)\n"
        "Conversions:\n"
        "  24 timestamps: naive local time in Europe/Paris -> UTC\n"
        "  4 token values: base64-wrapped Fernet -> standard Fernet\n"
        "  1 logins lowercased\n"
        "Rows kept: users 3, oauth_tokens 2, instances 1, audit_log 3, config 5\n"
        "Dry run: nothing was written.\n"
    )
    assert snapshot(db.parent) == before, "a dry run writes nothing: no backup, no key, no change"


def test_adopt_report_lists_the_deployment_variants(runner, tmp_path):
    key = Fernet.generate_key()
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "k").chmod(0o600)
    db = tmp_path / "kissbot.db"
    build_v4(db, key, VARIANT_DDL)
    result = run_adopt(runner, db, tmp_path / "k", "--dry-run")
    assert result.exit_code == 0, result.output
    for line in (
        "  users.display_name: NOT NULL (baseline: nullable)\n",
        "  users.twitch_login: not unique (baseline: unique)\n",
        "  instances.stop_time: missing (added, empty)\n",
        "  index idx_users_login on users: not in the baseline (dropped)\n",
        "  index idx_instances_status on instances: not in the baseline (dropped)\n",
        "  trigger update_users_timestamp on users: not in the baseline (dropped)\n",
        "  trigger update_oauth_tokens_timestamp on oauth_tokens: not in the baseline (dropped)\n",
        "  24 timestamps: naive local time in Europe/Paris -> UTC\n",
    ):
        assert line in result.output


def test_adopting_twice_is_harmless(runner, v4):
    db, key_file = v4
    assert run_adopt(runner, db, key_file).exit_code == 0
    before = snapshot(db.parent)
    again = run_adopt(runner, db, key_file)
    assert again.exit_code == 0, again.output
    assert again.output == f"Database {db} is already adopted (migration {HEAD}): nothing to do.\n"
    assert snapshot(db.parent) == before


def test_a_database_made_by_kissbot_is_already_adopted(runner, tmp_path):
    db = tmp_path / "new.db"
    DatabaseManager(db, tmp_path / "k").close()
    result = runner.invoke(cli, ["adopt", "--db", str(db), "--key-file", str(tmp_path / "k")])
    assert (result.exit_code, result.output) == (0, f"Database {db} is already adopted (migration {HEAD}): nothing to do.\n")


def assert_refused(result, before, folder, message):
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {message}\n"
    assert snapshot(folder) == before, "a refused adoption leaves every file byte-identical"


def test_wrong_key_is_refused_before_anything_is_written(runner, v4):
    db, key_file = v4
    key_file.write_bytes(Fernet.generate_key())
    before = snapshot(db.parent)
    assert_refused(
        run_adopt(runner, db, key_file), before, db.parent,
        "cannot adopt: the tokens of user(s) 1, 2 do not decrypt with this key (wrong key file?); nothing was changed",
    )


def test_missing_key_file_with_tokens_is_refused(runner, v4):
    db, key_file = v4
    key_file.unlink()
    before = snapshot(db.parent)
    assert_refused(
        run_adopt(runner, db, key_file), before, db.parent,
        f"cannot adopt: the database holds tokens but key file {key_file} does not exist",
    )


@pytest.mark.parametrize("ddl", [SPEC_DDL, VARIANT_DDL], ids=["spec", "variant-wal"])
def test_logins_differing_only_by_case_are_listed_and_refused(runner, tmp_path, ddl):
    key = Fernet.generate_key()
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "k").chmod(0o600)
    db = tmp_path / "kissbot.db"
    build_v4(db, key, ddl)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO users (twitch_user_id, twitch_login, display_name) VALUES ('9', 'Serda_Bot', 'x')")
        conn.execute("INSERT INTO users (twitch_user_id, twitch_login, display_name) VALUES ('10', 'MORTHY', 'y')")
    before = snapshot(tmp_path)
    assert_refused(
        run_adopt(runner, db, tmp_path / "k"), before, tmp_path,
        "cannot adopt: logins differing only by case: 'morthy' (user 3) / 'MORTHY' (user 5), "
        "'serda_bot' (user 1) / 'Serda_Bot' (user 4); fix these, then run adopt again (nothing was changed)",
    )
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM users WHERE id IN (4, 5)")
    assert run_adopt(runner, db, tmp_path / "k").exit_code == 0


def test_adopt_refuses_what_it_does_not_recognise(runner, tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = runner.invoke(cli, ["adopt", "--db", str(empty)])
    assert result.output == f"Error: {empty} has no kissbot tables: nothing to adopt (create a store with `kissbot init-db`)\n"
    missing = runner.invoke(cli, ["adopt", "--db", str(tmp_path / "nope.db")])
    assert (missing.exit_code, missing.output) == (1, f"Error: no database at {tmp_path / 'nope.db'}\n")
    postgres = runner.invoke(cli, ["adopt", "--url", "postgresql+psycopg://kissbot@db/kissbot"])
    assert (postgres.exit_code, postgres.output) == (1, "Error: adopt works on SQLite files only: give --db PATH\n")
    bad_zone = runner.invoke(cli, ["adopt", "--db", str(empty), "--assume-tz", "Mars/Olympus"])
    assert bad_zone.exit_code == 1 and len(bad_zone.output.splitlines()) == 1
    assert "unknown time zone 'Mars/Olympus'" in bad_zone.output


@pytest.mark.parametrize("ddl", [SPEC_DDL, VARIANT_DDL], ids=["spec", "variant-wal"])
def test_unversioned_database_is_refused_by_every_entry_point(runner, tmp_path, ddl):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    key_file.write_bytes(Fernet.generate_key())
    key_file.chmod(0o600)
    build_v4(db, key_file.read_bytes(), ddl)
    before = snapshot(db.parent)
    message = f"database {db} has kissbot tables but no migration version: run `kissbot adopt` first"
    for command in (["init-db"], ["stats"]):
        result = runner.invoke(cli, [*command, "--db", str(db), "--key-file", str(key_file)])
        assert result.exit_code == 1, result.output
        assert result.output.splitlines()[-1] == f"Error: {message}"
        assert [line for line in result.output.splitlines() if line.startswith("Error")] == [f"Error: {message}"]
        assert snapshot(db.parent) == before
    from kissbot.errors import UnversionedDatabase

    with pytest.raises(UnversionedDatabase, match="run `kissbot adopt` first"):
        DatabaseManager(db, key_file)
    assert snapshot(db.parent) == before


def test_adoption_is_one_transaction(v4, monkeypatch):
    """A failure after the tables were rebuilt and 0001 stamped leaves the data as it was."""
    from alembic import command

    from kissbot.adopt import adopt

    db, key_file = v4
    with closing(sqlite3.connect(db)) as conn:
        original = list(conn.iterdump())

    def broken_upgrade(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(command, "upgrade", broken_upgrade)
    with pytest.raises(RuntimeError, match="disk on fire"):
        adopt(db, key_file=key_file, assume_tz="Europe/Paris")
    with closing(sqlite3.connect(db)) as conn:
        assert list(conn.iterdump()) == original


def test_default_zone_is_the_machines(monkeypatch, tmp_path):
    from kissbot.adopt import adopt

    monkeypatch.setenv("TZ", "America/New_York")
    key = Fernet.generate_key()
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "k").chmod(0o600)
    build_v4(tmp_path / "kissbot.db", key)
    report = adopt(tmp_path / "kissbot.db", key_file=tmp_path / "k")
    assert report.zone == "America/New_York"
    with DatabaseManager(tmp_path / "kissbot.db", tmp_path / "k") as mgr:
        assert mgr.get_tokens(1)["expires_at"] == datetime(2025, 11, 5, 5, 46, 8, tzinfo=timezone.utc)


def test_no_tokens_needs_no_key_and_creates_none(runner, v4):
    db, key_file = v4
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM oauth_tokens")
    key_file.unlink()
    result = run_adopt(runner, db, key_file)
    assert result.exit_code == 0, result.output
    assert "  0 token values: base64-wrapped Fernet -> standard Fernet\n" in result.output
    assert not key_file.exists()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("ALTER TABLE oauth_tokens ADD COLUMN token_type TEXT", "oauth_tokens has column(s) token_type that kissbot's schema cannot hold"),
        ("INSERT INTO instances (channel_id, bot_user_id) VALUES (2, 77)", "instances row 2 refers to a missing users row"),
        (
            "INSERT INTO oauth_tokens (user_id, access_token_encrypted, refresh_token_encrypted, expires_at)"
            " SELECT user_id, access_token_encrypted, refresh_token_encrypted, expires_at FROM oauth_tokens WHERE user_id = 1",
            "user 1 has 2 token rows (the baseline holds one per user)",
        ),
        ("UPDATE audit_log SET timestamp = 'yesterday' WHERE id = 1", "values that are not timestamps: audit_log.timestamp 'yesterday'"),
    ],
    ids=["extra-column", "broken-foreign-key", "two-token-rows", "bad-timestamp"],
)
def test_rows_the_baseline_cannot_hold_are_refused(runner, v4, sql, reason):
    db, key_file = v4
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql)
    before = snapshot(db.parent)
    result = run_adopt(runner, db, key_file)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: cannot adopt: {reason}")
    assert result.output.endswith("nothing was changed)\n") and result.output.count("\n") == 1
    assert snapshot(db.parent) == before
