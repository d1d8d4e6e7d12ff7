"""Failed and read-only commands leave no trace; killed runs' temporary files are swept; symlinks; file modes.

Through the real CLI on real files: a command that fails prints one line, exits 1 and leaves every file of
the folder byte-identical; a read-only command never creates, migrates or converts anything.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from kissbot import DatabaseManager
from kissbot.backup import backup_sqlite
from kissbot.cli import cli
from kissbot.migrations import HEAD

from test_adopt import build_v4
from test_cli_ops import one_line_error, runner, store  # noqa: F401  (fixtures: a CliRunner; alice and bob)
from test_hostile import digest

PROCESS_TIMEOUT = 60
KISSBOT = [sys.executable, "-c", "from kissbot.cli import cli; cli()"]


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
    left.insert(0, "..kissbot.key.999999999.89abcdef.tmp")
    # A temporary file of a process still running (this one) is never touched.
    live = db.parent / f".kissbot.db.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"in progress")
    # A killed `backup --with-key` leaves a copy of the key, named after the key file.
    key_copy = db.parent / "..kissbot.key.999999999.89abcdef.tmp"
    key_copy.write_bytes(b"a copy of the key")
    os.utime(key_copy, (0, 0))

    doctor = run_kissbot("doctor", "--db", str(db), "--key-file", str(key))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert (
        f"[warning] 3 temporary files left by interrupted backup, restore or import runs: {left[1]}, {left[2]}, {left[0]}; "
        f"fix: the next `kissbot backup` removes them, or delete them from {db.parent}\n"
    ) in doctor.stdout

    backup = run_kissbot("backup", "--db", str(db), "--key-file", str(key), "--with-key", str(db.parent / "copy.backup"))
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
        f"Error: cannot adopt: the adopted database would not match migration {HEAD}: users.display_name holds blob "
        "in 1 row(s), kissbot stores text; nothing was changed\n"
    )
    assert digest(folder) == before, "no WAL conversion, no backup, nothing written"
    assert sorted(p.name for p in folder.iterdir()) == [".kissbot.key", "kissbot.db"]


# --- restore through a symbolic link ---------------------------------------------------------------


def test_restore_through_a_symlink_restores_its_target_and_keeps_the_link(runner, store, tmp_path):
    db, key = store
    backup = backup_sqlite(db, tmp_path / "before-bob.backup")
    with DatabaseManager(db, key) as mgr:
        mgr.create_user("33", "carol")
    link = tmp_path / "link.db"
    link.symlink_to(db)
    result = runner.invoke(cli, ["restore", "--db", str(link), "--key-file", str(key), str(backup)])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(db)
    with DatabaseManager(db, key) as mgr:
        assert [u["twitch_login"] for u in mgr.list_users()] == ["alice", "bob"]
    (previous,) = [p for p in db.parent.iterdir() if p.name.startswith("kissbot.db.backup_")]
    with closing(sqlite3.connect(previous)) as conn:
        assert conn.execute("SELECT twitch_login FROM users ORDER BY id").fetchall() == [("alice",), ("bob",), ("carol",)]


# --- read-only commands never migrate, create or convert ------------------------------------------

READ_ONLY = [
    ["stats"], ["users"], ["tokens"], ["instances"], ["audit"], ["config", "list"],
    ["config", "get", "max_crash_count"], ["key", "status"], ["maintenance", "integrity"], ["metrics"],
]


def old_store(folder: Path) -> tuple[Path, Path]:
    """A store at migration 0001 (with a user), as an older kissbot left it."""
    from kissbot.engine import create_engine
    from kissbot.migrations import upgrade

    db = folder / "kissbot.db"
    engine = create_engine(db)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO users (twitch_user_id, twitch_login) VALUES ('11', 'alice')")
    finally:
        engine.dispose()
    return db, folder / ".kissbot.key"


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_read_only_command_does_not_migrate_an_old_store(runner, tmp_path, command):
    db, key = old_store(tmp_path)
    before = digest(tmp_path)
    result = runner.invoke(cli, [*command, "--db", str(db), "--key-file", str(key)])
    if command != ["maintenance", "integrity"]:
        assert one_line_error(result) == (
            f"Error: database {db} is at migration 0001, this kissbot needs {HEAD}: migrate it with kissbot init-db\n"
        )
    assert digest(tmp_path) == before, "nothing migrated, created or converted"


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_read_only_command_leaves_an_empty_file_empty(runner, tmp_path, command):
    db = tmp_path / "kissbot.db"
    db.touch()
    result = runner.invoke(cli, [*command, "--db", str(db), "--key-file", str(tmp_path / "k")])
    if command == ["maintenance", "integrity"]:
        assert (result.exit_code, result.output) == (0, "integrity_check: ok\n")
    else:
        assert one_line_error(result) == f"Error: database {db} has no kissbot tables; create them with kissbot init-db\n"
    assert [(p.name, p.stat().st_size) for p in tmp_path.iterdir()] == [("kissbot.db", 0)]


def test_a_refused_key_retire_records_nothing(runner, store):
    db, key = store
    with closing(sqlite3.connect(db)) as conn:  # a store that has not recorded its key's fingerprint yet
        conn.execute("DELETE FROM config WHERE key = 'key_fingerprint_v1'")
        conn.commit()
    before = digest(db.parent)
    result = runner.invoke(cli, ["key", "retire", "1", "--db", str(db), "--key-file", str(key)])
    assert one_line_error(result) == (
        f"Error: key version 1 is the primary key of {key}: run kissbot key rotate, then retire it\n"
    )
    assert digest(db.parent) == before


def test_a_failed_migrate_yaml_on_an_old_store_leaves_no_backup_and_no_migration(runner, tmp_path):
    db, key = old_store(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        "twitch:\n  tokens:\n    alice:\n      user_id: '99'\n      access_token: a-token\n      refresh_token: r-token\n"
    )
    before = digest(tmp_path)
    result = runner.invoke(cli, ["migrate-yaml", str(config), "--db", str(db), "--key-file", str(key)])
    assert one_line_error(result) == (
        "Error: twitch.tokens.alice: login 'alice' belongs to Twitch user id 11 in the database, not 99\n"
    )
    assert digest(tmp_path) == before, "no backup, no migration, no key"


# --- odd files, missing folders, full disks, file modes --------------------------------------------


def test_import_tio_refuses_a_fifo_instead_of_hanging(tmp_path):
    fifo = tmp_path / "tokens.json"
    os.mkfifo(fifo)
    # A subprocess, bounded in time: on a hang the test fails instead of blocking the suite.
    result = run_kissbot("import-tio", str(fifo), "--db", str(tmp_path / "kissbot.db"))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"Error: token file {fifo} is not a regular file\n")
    config = run_kissbot("migrate-yaml", str(fifo), "--db", str(tmp_path / "kissbot.db"))
    assert config.stderr == f"Error: config file {fifo} is not a regular file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]


def test_a_missing_directory_is_reported_as_missing(runner, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("twitch:\n  tokens:\n    alice:\n      user_id: '1'\n      access_token: a\n      refresh_token: r\n")
    db = tmp_path / "nowhere" / "kissbot.db"
    result = runner.invoke(cli, ["migrate-yaml", str(config), "--db", str(db), "--key-file", str(tmp_path / "k")])
    assert one_line_error(result) == f"Error: cannot open database {db}: directory {db.parent} does not exist\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


STORE_FILES = textwrap.dedent(
    """
    import os, stat, sys
    from kissbot import DatabaseManager

    os.umask(int(sys.argv[2], 8))
    db = os.path.join(sys.argv[1], "kissbot.db")
    with DatabaseManager(db, os.path.join(sys.argv[1], ".kissbot.key")) as mgr:
        mgr.store_tokens(mgr.create_user("1", "alice"), "access", "refresh", 60)
        for name in sorted(os.listdir(sys.argv[1])):
            print(name, oct(stat.S_IMODE(os.stat(os.path.join(sys.argv[1], name)).st_mode)))
    """
)


@pytest.mark.parametrize("umask", ["022", "000"])
def test_the_database_and_its_wal_and_shm_are_created_0600(tmp_path, umask):
    made = subprocess.run(
        [sys.executable, "-c", STORE_FILES, str(tmp_path), umask], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout == (
        ".kissbot.key 0o600\nkissbot.db 0o600\nkissbot.db-shm 0o600\nkissbot.db-wal 0o600\n"
    )


def can_mount() -> bool:
    """True if this process holds CAP_SYS_ADMIN (bit 21 of its effective capabilities), which ``mount`` needs."""
    status = Path("/proc/self/status").read_text()
    effective = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    return bool(int(effective, 16) >> 21 & 1)


@pytest.fixture
def full_disk(tmp_path):
    """A 512 KiB tmpfs: a real file system that fills up.

    Mounting needs CAP_SYS_ADMIN (root outside a container, or a privileged
    one); without it the test skips and says so. With it, a failed mount fails.
    """
    if not can_mount():
        pytest.skip("a full disk needs a 512 KiB tmpfs, and mounting one needs CAP_SYS_ADMIN, which this process lacks")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a small tmpfs although CAP_SYS_ADMIN is held: {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_at_first_key_creation_says_so(runner, full_disk):
    db, key = full_disk / "kissbot.db", full_disk / ".kissbot.key"
    assert runner.invoke(cli, ["init-db", "--db", str(db)]).exit_code == 0
    config = full_disk.parent / "config.yaml"
    config.write_text("twitch:\n  tokens:\n    alice:\n      user_id: '1'\n      access_token: a\n      refresh_token: r\n")
    fd = os.open(full_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    result = runner.invoke(cli, ["migrate-yaml", str(config), "--db", str(db), "--key-file", str(key), "--no-backup"])
    message = one_line_error(result)
    assert "disk I/O error" not in message
    assert message in (
        f"Error: cannot write database {db}: the disk is full; free some space and run it again\n",
        f"Error: cannot create key file {key}: No space left on device\n",
    )
