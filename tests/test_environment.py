"""A bad environment gives one line and writes nothing: read-only directory, not SQLite, truncated file.

Also: the SQLite ``synchronous`` mode comes from the argument, the CLI or
``KISSBOT_SQLITE_SYNCHRONOUS``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.errors import ConfigurationError, DatabaseError

KISSBOT = shutil.which("kissbot", path=os.path.dirname(sys.executable)) or "kissbot"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _make_store(folder: Path) -> tuple[Path, Path]:
    db, key = folder / "kissbot.db", folder / ".kissbot.key"
    with DatabaseManager(db, key) as mgr:
        uid = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(uid, "access", "refresh", 3600)
    return db, key


def _not_sqlite(db: Path) -> str:
    db.write_bytes(b"channel,bot\nel_serda,serda_bot\n" * 50)
    return f"cannot open database {db}: not a SQLite database"


def _truncated_header(db: Path) -> str:
    db.write_bytes(db.read_bytes()[:60])
    return f"cannot open database {db}: truncated to 60 bytes; restore it from a backup"


def _truncated_pages(db: Path) -> str:
    size = db.stat().st_size
    db.write_bytes(db.read_bytes()[:8192])
    return f"cannot open database {db}: truncated, it holds 8192 of its {size} bytes; restore it from a backup"


@pytest.mark.parametrize("damage", [_not_sqlite, _truncated_header, _truncated_pages])
def test_a_bad_database_file_is_one_line_and_untouched(tmp_path, damage):
    db, key = _make_store(tmp_path)
    key.unlink()  # nor may a new key appear
    message = damage(db)
    before = _snapshot(tmp_path)
    with pytest.raises(DatabaseError) as info:
        DatabaseManager(db, key)
    assert str(info.value) == message
    result = CliRunner().invoke(cli, ["stats", "--db", str(db), "--key-file", str(key)])
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    assert _snapshot(tmp_path) == before


def _run_in_read_only(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` while ``folder`` is read-only (chmod, or a read-only bind mount for root)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only directory")
    script = 'mount --bind -o ro "$1" "$1" || exit 99; shift; exec "$@"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *argv], capture_output=True, text=True, timeout=60
    )
    if result.returncode == 99:
        pytest.skip(f"running as root and cannot bind-mount read-only: {result.stderr.strip()}")
    return result


@pytest.mark.parametrize("case", ["existing store", "existing store without its key", "new store"])
def test_a_database_in_a_read_only_directory_is_one_line_and_untouched(tmp_path, case):
    folder = tmp_path / "ro"
    folder.mkdir()
    db, key = _make_store(folder)
    if case != "existing store":
        key.unlink()
    if case == "new store":
        db.unlink()
    before = _snapshot(folder)
    message = (
        f"cannot open database {db}: its directory is not writable, and SQLite's WAL mode must create "
        "kissbot.db-wal and kissbot.db-shm beside it"
    )
    library = _run_in_read_only(
        folder,
        [sys.executable, "-c", "import sys; from kissbot import DatabaseManager; DatabaseManager(sys.argv[1], sys.argv[2]).get_stats()", str(db), str(key)],
    )
    assert library.returncode == 1
    assert library.stderr.strip().splitlines()[-1] == f"kissbot.errors.DatabaseError: {message}"
    command = _run_in_read_only(folder, [KISSBOT, "stats", "--db", str(db), "--key-file", str(key)])
    if case == "new store":  # stats never creates a store
        message = f"database {db} does not exist; create it with kissbot init-db"
    assert (command.returncode, command.stdout, command.stderr) == (1, "", f"Error: {message}\n")
    assert _snapshot(folder) == before


def _synchronous(mgr: DatabaseManager) -> int:
    with mgr.engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA synchronous").scalar_one()


def test_synchronous_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KISSBOT_SQLITE_SYNCHRONOUS", raising=False)
    db, key = tmp_path / "k.db", tmp_path / "k.key"
    with DatabaseManager(db, key) as mgr:
        assert _synchronous(mgr) == 1  # NORMAL
    monkeypatch.setenv("KISSBOT_SQLITE_SYNCHRONOUS", "full")
    with DatabaseManager(db, key) as mgr:
        assert _synchronous(mgr) == 2
    with DatabaseManager(db, key, synchronous="extra") as mgr:
        assert _synchronous(mgr) == 3
    monkeypatch.setenv("KISSBOT_SQLITE_SYNCHRONOUS", "sometimes")
    with pytest.raises(ConfigurationError, match="^KISSBOT_SQLITE_SYNCHRONOUS must be one of OFF, NORMAL, FULL, EXTRA, not 'sometimes'$"):
        DatabaseManager(db, key)


def test_cli_synchronous_option_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KISSBOT_SQLITE_SYNCHRONOUS", raising=False)
    db, key = tmp_path / "k.db", tmp_path / "k.key"
    runner = CliRunner()
    assert runner.invoke(cli, ["init-db", "--db", str(db), "--synchronous", "FULL"]).exit_code == 0
    before = _snapshot(tmp_path)
    result = runner.invoke(cli, ["stats", "--db", str(db), "--key-file", str(key), "--synchronous", "bogus"])
    assert (result.exit_code, result.output) == (1, "Error: synchronous must be one of OFF, NORMAL, FULL, EXTRA, not 'bogus'\n")
    result = runner.invoke(
        cli, ["stats", "--db", str(db), "--key-file", str(key)], env={"KISSBOT_SQLITE_SYNCHRONOUS": "bogus"}
    )
    assert (result.exit_code, result.output) == (
        1, "Error: KISSBOT_SQLITE_SYNCHRONOUS must be one of OFF, NORMAL, FULL, EXTRA, not 'bogus'\n"
    )
    assert _snapshot(tmp_path) == before
