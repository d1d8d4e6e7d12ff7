"""Failed and read-only commands leave no trace; killed runs' temporary files are swept; symlinks; file modes.

Through the real CLI on real files: a command that fails prints one line, exits 1 and leaves every file of
the folder byte-identical; a read-only command never creates, migrates or converts anything.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from kissbot import DatabaseManager
from kissbot.backup import backup_sqlite
from kissbot.cli import cli

from test_adopt import build_v4

PROCESS_TIMEOUT = 60
KISSBOT = [sys.executable, "-c", "from kissbot.cli import cli; cli()"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def store(tmp_path):
    """A closed SQLite store in its own folder: alice with tokens."""
    folder = tmp_path / "live"
    folder.mkdir()
    db, key = folder / "kissbot.db", folder / ".kissbot.key"
    with DatabaseManager(db, key) as mgr:
        mgr.store_tokens(mgr.create_user("11", "alice"), "access-alice", "refresh-alice", 3600)
    return db, key


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1, result.output
    return result.output


# --- killed runs: their temporary files are swept by the next run, and doctor reports them -----

KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from kissbot.backup import _private_temp_file

    tmp = _private_temp_file(Path(sys.argv[1]))
    tmp.write_bytes(b"half a copy")
    Path(f"{tmp}-journal").write_bytes(b"its journal")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_kissbot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KISSBOT, *args], capture_output=True, text=True, timeout=PROCESS_TIMEOUT)


def test_a_killed_runs_temporary_files_are_reported_then_swept_by_the_next_run(store):
    db, key = store
    killed = subprocess.run([sys.executable, "-c", KILLED, str(db)], capture_output=True, timeout=PROCESS_TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in db.parent.iterdir() if p.name.endswith((".tmp", ".tmp-journal")))
    assert len(left) == 2
    # A temporary file of a process still running (this one) is never touched.
    live = db.parent / f".kissbot.db.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"in progress")

    doctor = run_kissbot("doctor", "--db", str(db), "--key-file", str(key))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert (
        f"[warning] 2 temporary files left by interrupted backup, restore or import runs: {left[0]}, {left[1]}; "
        f"fix: the next `kissbot backup` removes them, or delete them: rm {db.parent}/.kissbot.db.*.tmp*\n"
    ) in doctor.stdout

    backup = run_kissbot("backup", "--db", str(db), str(db.parent / "copy.backup"))
    assert backup.returncode == 0, backup.stderr
    assert sorted(p.name for p in db.parent.iterdir() if ".tmp" in p.name) == [live.name]
    doctor = run_kissbot("doctor", "--db", str(db), "--key-file", str(key))
    assert "[ok] no temporary files left by interrupted runs\n" in doctor.stdout


# --- failed commands change nothing --------------------------------------------------------------


def test_a_failed_adopt_leaves_the_v4_file_untouched_no_wal_no_backup(runner, tmp_path):
    folder = tmp_path / "bot"
    folder.mkdir()
    key = Fernet.generate_key()
    key_file = folder / ".kissbot.key"
    key_file.write_bytes(key + b"\n")
    key_file.chmod(0o600)
    db = folder / "kissbot.db"
    build_v4(db, key)
    with closing(sqlite3.connect(db)) as conn:  # a value the baseline's TEXT column holds, but kissbot cannot read
        conn.execute("UPDATE users SET display_name = X'00ff' WHERE id = 3")
        conn.commit()
    before = digest(folder)
    result = runner.invoke(cli, ["adopt", "--db", str(db), "--key-file", str(key_file), "--assume-tz", "UTC"])
    assert one_line_error(result) == (
        "Error: cannot adopt: the adopted database would not match migration 0002: users.display_name holds blob "
        "in 1 row(s), kissbot stores text; nothing was changed\n"
    )
    assert digest(folder) == before, "no WAL conversion, no backup, nothing written"
    assert sorted(p.name for p in folder.iterdir()) == [".kissbot.key", "kissbot.db"]


# --- restore through a symbolic link ---------------------------------------------------------------


def test_restore_through_a_symlink_restores_its_target_and_keeps_the_link(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "before-bob.backup")
    with DatabaseManager(db, key) as mgr:
        mgr.create_user("22", "bob")
    link = tmp_path / "link.db"
    link.symlink_to(db)
    result = runner.invoke(cli, ["restore", "--db", str(link), "--key-file", str(key), str(backup)])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(db)
    with DatabaseManager(db, key) as mgr:
        assert [u["twitch_login"] for u in mgr.list_users()] == ["alice"]
    (previous,) = [p for p in db.parent.iterdir() if p.name.startswith("kissbot.db.backup_")]
    with closing(sqlite3.connect(previous)) as conn:
        assert conn.execute("SELECT twitch_login FROM users ORDER BY id").fetchall() == [("alice",), ("bob",)]
