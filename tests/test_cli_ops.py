"""`kissbot cleanup-logs`, `backup`, `restore`, `maintenance` and `doctor` through the real CLI on real files."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, update

from kissbot import DatabaseManager
from kissbot.backup import backup_sqlite
from kissbot.crypto import TokenCipher, generate_key
from kissbot.engine import create_engine, writer
from kissbot.repo import TokenRepository, UserRepository
from kissbot.migrations import HEAD
from kissbot.models import audit_log, instances, oauth_tokens
from kissbot.types import utcnow
from kissbot.cli import cli

PROCESS_TIMEOUT = 60


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def store(tmp_path):
    """A closed SQLite store in its own folder: alice and bob with tokens."""
    folder = tmp_path / "live"
    folder.mkdir()
    db, key = folder / "kissbot.db", folder / ".kissbot.key"
    with DatabaseManager(db, key) as mgr:
        for twitch_id, login in (("11", "alice"), ("22", "bob")):
            uid = mgr.create_user(twitch_id, login)
            mgr.store_tokens(uid, f"access-{login}", f"refresh-{login}", 3600)
    return db, key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def read_rows(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"helper process exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- cleanup-logs ------------------------------------------------------------------------------


def test_cleanup_logs_deletes_old_events_and_prints_the_count(runner, store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        with mgr.session() as s:
            for age in (40, 35, 25):
                s.execute(insert(audit_log).values(event_type="old", timestamp=utcnow() - timedelta(days=age)))
        mgr.set_config("log_retention_days", 20)
        total = len(mgr.get_audit_log(limit=1000))
    args = ["--url", store_url, "--key-file", str(key_file)]
    result = runner.invoke(cli, ["cleanup-logs", *args, "--days", "30"])
    assert (result.exit_code, result.output) == (0, "Deleted 2 audit log entries older than 30 days\n")
    result = runner.invoke(cli, ["cleanup-logs", *args])
    assert (result.exit_code, result.output) == (0, "Deleted 1 audit log entries older than 20 days\n")
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert len(mgr.get_audit_log(limit=1000)) == total - 3


def test_cleanup_logs_without_a_setting_keeps_the_default_of_the_settings(runner, store_url, key_file, monkeypatch):
    from dataclasses import replace

    from kissbot.models import config
    from kissbot.settings import SETTINGS

    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        with mgr.session() as s:
            s.execute(insert(audit_log).values(event_type="old", timestamp=utcnow() - timedelta(days=8)))
            s.execute(config.delete().where(config.c.key == "log_retention_days"))
    monkeypatch.setitem(SETTINGS, "log_retention_days", replace(SETTINGS["log_retention_days"], default=7))
    result = runner.invoke(cli, ["cleanup-logs", "--url", store_url, "--key-file", str(key_file)])
    assert (result.exit_code, result.output) == (0, "Deleted 1 audit log entries older than 7 days\n")


def test_cleanup_logs_refuses_a_missing_database_and_negative_days(runner, tmp_path):
    result = runner.invoke(cli, ["cleanup-logs", "--db", str(tmp_path / "nope.db"), "--key-file", str(tmp_path / "k")])
    assert one_line_error(result) == f"Error: database {tmp_path / 'nope.db'} does not exist; create it with kissbot init-db\n"
    negative = runner.invoke(cli, ["cleanup-logs", "--db", str(tmp_path / "nope.db"), "--days", "-1"])
    assert one_line_error(negative) == "Error: Invalid value for '--days': -1 is not in the range 0<=x<=36600.\n"
    assert list(tmp_path.iterdir()) == []


# --- backup ------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kissbot import DatabaseManager

    db, key, progress, stop = sys.argv[1:5]
    deadline = time.monotonic() + 60
    with DatabaseManager(db, key) as mgr, open(progress, "a") as out:
        uid = mgr.get_user_by_login("alice")["id"]
        n = 0
        while not Path(stop).exists() and time.monotonic() < deadline:
            mgr.store_tokens(uid, f"access-{n}", f"refresh-{n}", 3600)
            mgr.log_event("writer_tick", user_id=uid, details={"n": n})
            n += 1
            out.write(f"{n}\\n")  # written only once both transactions committed
            out.flush()
    """
)


def test_backup_taken_while_another_process_writes_holds_every_committed_row(runner, store, tmp_path):
    db, key = store
    progress, stop, dest = tmp_path / "progress", tmp_path / "stop", tmp_path / "copy.db"
    progress.touch()

    def committed() -> int:
        return len(progress.read_text().splitlines())

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(key), str(progress), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: committed() >= 20, "20 commits", proc)
        before = committed()
        result = runner.invoke(cli, ["backup", "--db", str(db), str(dest)])
        after = committed()
        wait_for(lambda: committed() >= after + 20, "20 more commits after the backup", proc)
    finally:
        stop.touch()
        proc.wait(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr.read()
    assert result.exit_code == 0, result.output
    assert result.output == f"Backed up {db} to {dest} (integrity_check: ok)\n"

    assert read_rows(dest, "PRAGMA integrity_check") == [("ok",)]
    ticks = {json.loads(d)["n"] for (d,) in read_rows(dest, "SELECT details FROM audit_log WHERE event_type = 'writer_tick'")}
    assert set(range(before)) <= ticks
    assert ticks == set(range(len(ticks))), "a snapshot holds a prefix of the commits"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert not Path(f"{dest}-wal").exists() and not Path(f"{dest}-journal").exists()
    # The tokens in the copy are the ones committed with the last tick it holds.
    check = tmp_path / "check.db"
    shutil.copyfile(dest, check)
    with DatabaseManager(check, key) as mgr:
        assert mgr.get_tokens(mgr.get_user_by_login("alice")["id"])["access_token"] in {
            f"access-{max(ticks)}", f"access-{max(ticks) + 1}"
        }


def test_backup_default_name_is_private_and_holds_no_secret(runner, store):
    db, key = store
    result = runner.invoke(cli, ["backup", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 0, result.output
    made = [p for p in db.parent.iterdir() if p.name.startswith("kissbot.db.backup_")]
    assert len(made) == 1
    assert re.fullmatch(r"kissbot\.db\.backup_\d{8}_\d{6}", made[0].name)
    assert result.output == f"Backed up {db} to {made[0]} (integrity_check: ok)\n"
    assert stat.S_IMODE(made[0].stat().st_mode) == 0o600
    assert not any(p.name.endswith(".key") and p != key for p in db.parent.iterdir()), "no key beside the backup"
    assert b"access-alice" not in made[0].read_bytes()


def test_backup_into_a_folder_and_with_key(runner, store, tmp_path):
    db, key = store
    folder = tmp_path / "backups"
    folder.mkdir()
    result = runner.invoke(cli, ["backup", "--db", str(db), "--key-file", str(key), "--with-key", str(folder)])
    assert result.exit_code == 0, result.output
    (made,) = [p for p in folder.iterdir() if not p.name.endswith(".key")]
    key_copy = folder / f"{made.name}.key"
    assert key_copy.read_bytes().strip() == key.read_bytes().strip()
    assert stat.S_IMODE(key_copy.stat().st_mode) == 0o600
    assert result.stdout == f"Backed up {db} to {made} (integrity_check: ok)\nCopied the key to {key_copy}\n"
    assert result.stderr.startswith(f"Warning: {key_copy} decrypts every token in {made}")
    assert key.read_bytes().decode().strip() not in result.output


def test_backup_refuses_an_existing_destination_a_missing_database_and_postgresql(runner, store, tmp_path, postgresql_url):
    db, key = store
    existing = tmp_path / "taken.db"
    existing.write_bytes(b"keep me")
    before = snapshot(tmp_path)
    result = runner.invoke(cli, ["backup", "--db", str(db), str(existing)])
    assert one_line_error(result) == f"Error: backup {existing} already exists\n"
    missing = runner.invoke(cli, ["backup", "--db", str(tmp_path / "none.db"), str(tmp_path / "x")])
    assert one_line_error(missing) == f"Error: database {tmp_path / 'none.db'} does not exist\n"
    without_key = runner.invoke(cli, ["backup", "--db", str(db), "--with-key", "--key-file", str(tmp_path / "k"), str(tmp_path / "x")])
    assert one_line_error(without_key) == (
        f"Error: key file {tmp_path / 'k'} not found: restore {tmp_path / 'k'} from your backup, "
        "or point to the right key with --key-file PATH or KISSBOT_KEY_FILE\n"
    )
    assert snapshot(tmp_path) == before
    pg = runner.invoke(cli, ["backup", "--url", postgresql_url])
    assert "pg_dump" in one_line_error(pg)
    assert "pg_restore" in one_line_error(runner.invoke(cli, ["restore", "--url", postgresql_url, str(existing)]))


# --- restore -----------------------------------------------------------------------------------


def _corrupt(path: Path, good: Path) -> None:
    data = bytearray(good.read_bytes())
    garbage = random.Random(4096)
    page = 4096
    for offset in range(2 * page, len(data), page):  # keep the header page, garble every other
        data[offset + 16 : offset + 512] = garbage.randbytes(496)
    path.write_bytes(bytes(data))


def _other_key_backup(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    other.mkdir()
    with DatabaseManager(other / "kissbot.db", other / "other.key") as mgr:
        mgr.store_tokens(mgr.create_user("33", "carol"), "a", "r", 60)
    return backup_sqlite(other / "kissbot.db", tmp_path / "other-key.backup")


def _unknown_revision_backup(tmp_path: Path, db: Path) -> Path:
    dest = backup_sqlite(db, tmp_path / "future.backup")
    conn = sqlite3.connect(dest)
    conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    conn.commit()
    conn.close()
    return dest


def _foreign_backup(tmp_path: Path) -> Path:
    dest = tmp_path / "notes.sqlite"
    conn = sqlite3.connect(dest)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    return dest


@pytest.mark.parametrize(
    "kind, message",
    [
        ("garbage", re.escape("is not a usable SQLite database (file is not a database); nothing restored")),
        ("corrupt", r"fails integrity_check \(|is not a usable SQLite database \(database disk image is malformed\)"),
        ("foreign", re.escape("is not a kissbot database (no kissbot tables or no alembic_version); nothing restored")),
        ("future", re.escape("is at migration 9999_future, which this kissbot version does not know; nothing restored")),
        ("other-key", r"tokens of 1 of 1 users do not decrypt with the current key: they need key version 1 "
                      r"\(fingerprint [0-9a-f]{16}\), restore that key from your backup; nothing restored"),
    ],
)
def test_restore_refuses_a_bad_backup_and_changes_nothing(runner, store, tmp_path, kind, message):
    db, key = store
    good = backup_sqlite(db, tmp_path / "good.backup")
    if kind == "garbage":
        bad = tmp_path / "garbage.backup"
        bad.write_bytes(os.urandom(64 * 1024))
    elif kind == "corrupt":
        bad = tmp_path / "corrupt.backup"
        _corrupt(bad, good)
    elif kind == "foreign":
        bad = _foreign_backup(tmp_path)
    elif kind == "future":
        bad = _unknown_revision_backup(tmp_path, db)
    else:
        bad = _other_key_backup(tmp_path)
    live, backups = snapshot(db.parent), snapshot(tmp_path / "other") if kind == "other-key" else None
    bad_bytes = bad.read_bytes()
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(bad)])
    assert one_line_error(result).startswith(f"Error: {bad}")
    assert re.search(message, result.output), result.output
    assert "access-" not in result.output
    assert snapshot(db.parent) == live, "database, key and folder unchanged"
    assert bad.read_bytes() == bad_bytes, "the backup itself is never modified"
    if backups is not None:
        assert snapshot(tmp_path / "other") == backups


def test_restore_round_trips_and_leaves_no_stale_wal(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "before-dave.backup")
    with DatabaseManager(db, key) as mgr:
        mgr.store_tokens(mgr.get_user_by_login("alice")["id"], "access-new", "refresh-new", 60)
        mgr.create_user("44", "dave")
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(backup)])
    assert result.exit_code == 0, result.output
    (previous,) = [p for p in db.parent.iterdir() if p.name.startswith("kissbot.db.backup_")]
    assert result.output == (
        f"Backed up the current database to {previous}\n"
        f"Restored {db} from {backup} (tokens of 2 users decrypt with {key})\n"
    )
    assert sorted(p.name for p in db.parent.iterdir()) == sorted([".kissbot.key", "kissbot.db", previous.name])
    assert stat.S_IMODE(previous.stat().st_mode) == 0o600
    with DatabaseManager(db, key) as mgr:
        assert mgr.get_tokens(mgr.get_user_by_login("alice")["id"])["access_token"] == "access-alice"
        assert mgr.get_user_by_login("dave") is None
    assert read_rows(previous, "SELECT twitch_login FROM users ORDER BY 1") == [("alice",), ("bob",), ("dave",)]


def test_a_restored_database_is_in_wal_mode_and_doctor_says_so(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "snapshot.backup")
    assert runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(backup)]).exit_code == 0
    assert db.read_bytes()[18:20] == b"\x02\x02"  # the header's WAL read/write versions
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert "[ok] journal mode: wal" in result.output, result.output


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from kissbot import DatabaseManager

    mgr = DatabaseManager(sys.argv[1], sys.argv[2])
    mgr.create_user("55", "killed_writer")
    os._exit(0)  # killed: its committed transaction stays in the -wal, never checkpointed
    """
)


def test_restore_never_applies_the_old_wal_to_the_new_database(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "clean.backup")
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(db), str(key)], check=True, timeout=PROCESS_TIMEOUT)
    wal = Path(f"{db}-wal")
    assert wal.stat().st_size > 0, "the killed writer left frames in the -wal"
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(backup)])
    assert result.exit_code == 0, result.output
    assert not wal.exists() and not Path(f"{db}-shm").exists()
    assert read_rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert read_rows(db, "SELECT twitch_login FROM users ORDER BY 1") == [("alice",), ("bob",)]
    (previous,) = [p for p in db.parent.iterdir() if p.name.startswith("kissbot.db.backup_")]
    assert ("killed_writer",) in read_rows(previous, "SELECT twitch_login FROM users"), "the -wal's commit was kept"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kissbot import DatabaseManager

    with DatabaseManager(sys.argv[1], sys.argv[2]) as mgr:
        mgr.get_stats()
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not Path(sys.argv[3]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    """
)


def test_restore_refuses_while_a_bot_holds_the_database(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "b.backup")
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db), str(key), str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        db_bytes = db.read_bytes()
        names = sorted(p.name for p in db.parent.iterdir())
        result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(backup)])
        assert one_line_error(result) == (
            f"Error: database {db} is in use by another process: stop every bot using it, then restore\n"
        )
        assert db.read_bytes() == db_bytes
        assert sorted(p.name for p in db.parent.iterdir()) == names
    finally:
        stop.touch()
        proc.wait(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0


def test_restore_into_a_missing_database_and_without_a_key(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "b.backup")
    target = tmp_path / "new" / "kissbot.db"
    target.parent.mkdir()
    no_key = runner.invoke(cli, ["restore", "--db", str(target), "--key-file", str(tmp_path / "nokey"), str(backup)])
    assert one_line_error(no_key) == (
        f"Error: key file {tmp_path / 'nokey'} not found: restore {tmp_path / 'nokey'} from your backup, "
        "or point to the right key with --key-file PATH or KISSBOT_KEY_FILE\n"
    )
    assert list(target.parent.iterdir()) == []
    result = runner.invoke(cli, ["restore", "--db", str(target), "--key-file", str(key), str(backup)])
    assert result.output == f"Restored {target} from {backup} (tokens of 2 users decrypt with {key})\n"
    assert [p.name for p in target.parent.iterdir()] == ["kissbot.db"]


def test_restore_of_a_missing_backup_says_so_before_looking_for_the_key(runner, store, tmp_path):
    db, _key = store
    before = snapshot(db.parent)
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(tmp_path / "nokey"), "foo.db"])
    assert one_line_error(result) == "Error: backup foo.db not found\n"
    assert snapshot(db.parent) == before


# --- maintenance -------------------------------------------------------------------------------


def test_maintenance_on_a_live_wal_file(runner, tmp_path, key_file):
    db = tmp_path / "kissbot.db"
    with DatabaseManager(db, key_file) as mgr:  # stays open, as a running bot would: the -wal persists
        for i in range(30):
            mgr.log_event("tick", details={"n": i})
        wal = Path(f"{db}-wal")
        assert wal.stat().st_size > 0
        args = ["--db", str(db)]
        passive = runner.invoke(cli, ["maintenance", "checkpoint", *args])
        assert passive.exit_code == 0, passive.output
        match = re.fullmatch(r"Checkpoint \(PASSIVE\): (\d+) of (\d+) WAL pages copied into the database\n", passive.output)
        assert match and int(match[1]) == int(match[2]) > 0, passive.output
        mgr.log_event("tick")
        truncate = runner.invoke(cli, ["maintenance", "checkpoint", "--mode", "truncate", *args])
        assert truncate.exit_code == 0, truncate.output
        assert truncate.output == "Checkpoint (TRUNCATE): the WAL is copied into the database and emptied\n"
        again = runner.invoke(cli, ["maintenance", "checkpoint", *args])
        assert again.output == "Checkpoint (PASSIVE): the WAL is empty, nothing to copy\n"
        assert wal.stat().st_size == 0
        assert runner.invoke(cli, ["maintenance", "integrity", *args]).output == "integrity_check: ok\n"
        assert runner.invoke(cli, ["maintenance", "vacuum", *args]).output == "VACUUM: done\n"
        assert runner.invoke(cli, ["maintenance", "analyze", *args]).output == "ANALYZE: done\n"
        assert ("sqlite_stat1",) in read_rows(db, "SELECT name FROM sqlite_master")
        assert len(mgr.get_audit_log(limit=100)) == 31


def test_maintenance_errors_are_one_line(runner, tmp_path, store):
    db, _ = store
    broken = tmp_path / "broken.db"
    _corrupt(broken, db)
    result = runner.invoke(cli, ["maintenance", "integrity", "--db", str(broken)])
    assert re.match(r"Error: (integrity_check found \d+ problems, first: |database .*: database disk image is malformed)", one_line_error(result))
    missing = runner.invoke(cli, ["maintenance", "vacuum", "--db", str(tmp_path / "none.db")])
    assert one_line_error(missing) == f"Error: database {tmp_path / 'none.db'} does not exist; create it with kissbot init-db\n"
    assert not (tmp_path / "none.db").exists()
    bad_mode = runner.invoke(cli, ["maintenance", "checkpoint", "--db", str(db), "--mode", "SOMETIMES"])
    assert one_line_error(bad_mode).startswith("Error: Invalid value for '--mode': 'SOMETIMES' is not one of ")
    assert one_line_error(runner.invoke(cli, ["maintenance", "reindex", "--db", str(db)])) == "Error: No such command 'reindex'.\n"


def test_maintenance_on_postgresql(runner, postgresql_url, tmp_path):
    with DatabaseManager(url=postgresql_url, key_file=tmp_path / "k"):
        pass
    args = ["--url", postgresql_url]
    assert runner.invoke(cli, ["maintenance", "vacuum", *args]).output == "VACUUM: done\n"
    assert runner.invoke(cli, ["maintenance", "analyze", *args]).output == "ANALYZE: done\n"
    for command in ("checkpoint", "integrity"):
        assert "SQLite" in one_line_error(runner.invoke(cli, ["maintenance", command, *args]))


# --- doctor ------------------------------------------------------------------------------------


def test_doctor_on_a_healthy_store(runner, store):
    db, key = store
    with DatabaseManager(db, key) as mgr:
        mgr.register_instance("alice", "bob", 4242)
    before = snapshot(db.parent)
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 0, result.output
    assert snapshot(db.parent) == before, "doctor changes and creates nothing (no -wal/-shm either)"
    assert result.output == (
        f"[ok] key file {key} is present with mode 0600\n"
        "[ok] integrity_check: ok\n"
        "[ok] journal mode: wal\n"
        f"[ok] migration at head ({HEAD})\n"
        f"[ok] schema: exactly migration {HEAD}'s tables, columns and indexes; rows well-typed\n"
        f"[ok] tokens of all 2 users decrypt with {key}\n"
        "[ok] no token needs reauthorization\n"
        "[ok] no token has expired\n"
        "[ok] 1 running instances, none stale\n"
        "[ok] no temporary files left by interrupted runs\n"
    )


def test_doctor_on_postgresql(runner, postgresql_url, key_file):
    with DatabaseManager(url=postgresql_url, key_file=key_file) as mgr:
        mgr.store_tokens(mgr.create_user("1", "alice"), "a", "r", 60)
    result = runner.invoke(cli, ["doctor", "--url", postgresql_url, "--key-file", str(key_file), "--json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.output)
    assert {f["level"] for f in findings} == {"ok"}
    assert [f["check"] for f in findings] == ["key-file", "migration", "schema", "decryption", "reauth", "expiry", "instances"]


def test_doctor_reports_an_unsafe_key_file_as_an_error(runner, store):
    db, key = store
    key.chmod(0o644)
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 1
    assert f"[error] key file {key} is readable by group or others (mode 0644); fix: chmod 600 {key}\n" in result.output


def test_doctor_names_the_users_a_wrong_key_cannot_decrypt(runner, store, tmp_path):
    db, key = store
    # carol's bot tokens stored with another key (below the manager, which would refuse that key at open)
    stranger = create_engine(db, cipher=TokenCipher(generate_key()))
    try:
        with writer(stranger).begin() as conn:
            carol = UserRepository(conn).create_user("33", "carol")
            TokenRepository(conn).store_tokens(carol, "access-carol", "refresh-carol", 3600)
    finally:
        stranger.dispose()
    with DatabaseManager(db, key) as mgr:  # her broadcaster tokens with the right one: still one user
        mgr.store_tokens(3, "access-carol-b", "refresh-carol-b", 3600, token_type="broadcaster")
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 1
    assert (
        f"[error] tokens of 1 of 3 users do not decrypt with {key} (user ids 3); fix: use the key file these tokens "
        "were stored with (from your backup); without it, reauthorize those users\n"
    ) in result.output
    assert "access-" not in result.output and "refresh-" not in result.output


def test_doctor_warns_about_reauth_failures_and_stale_instances(runner, store):
    db, key = store
    with DatabaseManager(db, key) as mgr:
        alice, bob = (mgr.get_user_by_login(login)["id"] for login in ("alice", "bob"))
        mgr.mark_tokens_expired(alice)
        for _ in range(3):
            mgr.increment_refresh_failures(bob)
        instance = mgr.register_instance("alice", "bob", 4242)
        with mgr.session() as s:
            s.execute(update(instances).where(instances.c.id == instance).values(last_heartbeat=utcnow() - timedelta(minutes=5)))
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 0, "warnings alone do not fail"
    lines = result.output.splitlines()
    assert "[warning] user alice (id 1), bot token: needs reauthorization (status expired); fix: run kissbot auth alice" in lines
    assert "[warning] user bob (id 2), bot token: 3 refresh failures (max_crash_count 3); fix: run kissbot auth bob" in lines
    (stale,) = [line for line in lines if line.startswith("[warning] instance")]
    assert re.match(r"\[warning\] instance 1 \(bob on alice, pid 4242\) is running but its last heartbeat was \d+ s ago \(limit 90 s\)", stale)


def test_doctor_warns_about_expired_tokens_and_when_the_last_refresh_was(runner, store):
    db, key = store
    with DatabaseManager(db, key) as mgr:
        with mgr.session() as s:
            s.execute(
                update(oauth_tokens).where(oauth_tokens.c.user_id == 2).values(expires_at=utcnow() - timedelta(minutes=90))
            )
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key)])
    assert result.exit_code == 0, "a warning alone does not fail"
    (line,) = [line for line in result.output.splitlines() if "expired" in line and line.startswith("[warning]")]
    assert re.fullmatch(
        r"\[warning\] 1 token\(s\) expired without being refreshed \(the oldest: bob's bot token, 1 h (29|30) min ago\); "
        r"last refresh: never; fix: run `kissbot refresh-worker` \(TWITCH_CLIENT_ID, TWITCH_CLIENT_SECRET\): it refreshes "
        r"tokens before they expire",
        line,
    ), line


def test_doctor_creates_nothing_and_reports_what_is_missing(runner, tmp_path):
    result = runner.invoke(cli, ["doctor", "--db", str(tmp_path / "kissbot.db"), "--key-file", str(tmp_path / "k.key")])
    assert result.exit_code == 1
    assert f"[error] database {tmp_path / 'kissbot.db'} does not exist; fix: create it with `kissbot init-db --db {tmp_path / 'kissbot.db'}`" in result.output
    assert list(tmp_path.iterdir()) == []


def test_doctor_warns_about_a_database_not_in_wal_mode(runner, store):
    db, key = store
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(key), "--json"])
    assert result.exit_code == 0
    (journal,) = [f for f in json.loads(result.output) if f["check"] == "journal-mode"]
    assert journal["level"] == "warning" and journal["message"].startswith("journal mode is delete")
    assert read_rows(db, "PRAGMA journal_mode") == [("delete",)], "doctor did not switch it"


def test_doctor_on_a_file_that_is_not_a_database(runner, tmp_path):
    db = tmp_path / "kissbot.db"
    db.write_bytes(b"not a database" * 500)
    before = snapshot(tmp_path)
    result = runner.invoke(cli, ["doctor", "--db", str(db), "--key-file", str(tmp_path / "k.key")])
    assert result.exit_code == 1
    assert f"[error] cannot read database {db}: file is not a database; fix: " in result.output
    assert snapshot(tmp_path) == before


def test_restore_refuses_a_live_copy_with_its_wal(runner, store, tmp_path):
    db, key = store
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(db), str(key)], check=True, timeout=PROCESS_TIMEOUT)
    copy = tmp_path / "copied.db"
    shutil.copyfile(db, copy)
    shutil.copyfile(f"{db}-wal", f"{copy}-wal")
    live = snapshot(db.parent)
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(copy)])
    assert one_line_error(result) == (
        f"Error: {copy} has a copied.db-wal beside it: it is a copy of a live database, not a backup; "
        "make one with `kissbot backup`\n"
    )
    assert snapshot(db.parent) == live


def test_restore_accepts_a_backup_at_an_older_known_migration(runner, store, tmp_path):
    from kissbot.engine import create_engine
    from kissbot.migrations import upgrade

    db, key = store
    old = tmp_path / "old.db"
    engine = create_engine(old)
    upgrade(engine, "0001")
    engine.dispose()
    backup = backup_sqlite(old, tmp_path / "old.backup")
    result = runner.invoke(cli, ["restore", "--db", str(db), "--key-file", str(key), str(backup)])
    assert result.exit_code == 0, result.output
    assert read_rows(db, "SELECT version_num FROM alembic_version") == [("0001",)]
    with DatabaseManager(db, key) as mgr:  # a bot opening it migrates it to head
        assert mgr.list_users() == []
    assert read_rows(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]


def test_backup_keep_prunes_only_the_backups_kissbot_made_of_that_store(runner, store, tmp_path):
    db, key = store
    folder = tmp_path / "backups"
    folder.mkdir()
    old = [folder / f"kissbot.db.backup_2020010{day}_000000" for day in (1, 2, 3)]
    for path in old:
        backup_sqlite(db, path)
    backup_sqlite(db, folder / "kissbot.db.backup_20200102_000000_2")   # a second one in that second
    backup_sqlite(db, folder / "other.db.backup_20190101_000000")      # another store's backup
    strangers = {
        "kissbot.db.backup_20190101_000000": b"not sqlite",                   # named like one, not one
        "kissbot.db.backup_20190102_000000.key": b"a key copy",
        "kissbot.db.backup_old": b"x",
        "notes.txt": b"mine",
    }
    for name, content in strangers.items():
        (folder / name).write_bytes(content)
        (folder / name).chmod(0o600)
    shutil.copy(old[0], folder / "kissbot.db.backup_20190103_000000")         # a copy with mode 0644
    (folder / "kissbot.db.backup_20190103_000000").chmod(0o644)
    (folder / "kissbot.db.backup_20190104_000000").symlink_to(old[0])       # a link to one

    result = runner.invoke(cli, ["backup", "--db", str(db), "--key-file", str(key), str(folder), "--keep", "2"])
    assert result.exit_code == 0, result.output
    made = Path(result.stdout.splitlines()[0].split(" to ")[1].split(" (")[0])
    assert result.stdout.splitlines()[1:] == [
        f"Pruned {folder / 'kissbot.db.backup_20200101_000000'}",
        f"Pruned {folder / 'kissbot.db.backup_20200102_000000'}",
        f"Pruned {folder / 'kissbot.db.backup_20200102_000000_2'}",
    ]
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        made.name, "kissbot.db.backup_20200103_000000", "other.db.backup_20190101_000000",
        *strangers, "kissbot.db.backup_20190103_000000", "kissbot.db.backup_20190104_000000",
    ])
    for name, content in strangers.items():
        assert (folder / name).read_bytes() == content


def test_backup_keep_beside_the_database_and_bad_values(runner, store):
    db, key = store
    args = ["backup", "--db", str(db), "--key-file", str(key)]
    for _ in range(3):
        assert runner.invoke(cli, args).exit_code == 0
    assert len(list(db.parent.glob("kissbot.db.backup_*"))) == 3
    result = runner.invoke(cli, [*args, "--keep", "1"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in db.parent.glob("kissbot.db.backup_*")] == [Path(result.stdout.split(" to ")[1].split(" (")[0]).name]
    assert result.stdout.count("Pruned ") == 3
    before = snapshot(db.parent)
    for bad in (["--keep", "0"], ["--keep", "x"], ["--keep-daily", "2"]):
        result = runner.invoke(cli, [*args, *bad])
        assert result.exit_code == 1, (bad, result.output)
        assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.output
    assert snapshot(db.parent) == before
