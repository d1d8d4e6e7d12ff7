"""Consistent online backups of a SQLite store, and restoring one.

A live SQLite database in WAL mode is spread over ``kissbot.db``,
``kissbot.db-wal`` and ``kissbot.db-shm``; copying the files while bots write
can give a torn copy. :func:`backup_sqlite` instead reads the database through
SQLite's online backup API in one step (one consistent snapshot, while other
processes keep writing), checks the copy with ``PRAGMA integrity_check``, and
only then puts it in place, with mode 0600, as one complete file. The key file
is never copied beside it unless asked (:func:`backup_key`).
:func:`restore_sqlite` checks a backup thoroughly before it swaps it in for
the current database.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from kissbot.crypto import TokenCheck, TokenCipher, read_key_ring, verify_tokens
from kissbot.engine import connect_sqlite_query_only
from kissbot.errors import BackupError, DatabaseBusy, NoDatabase, ValidationError
from kissbot.maintenance import integrity_problems
from kissbot.migrations import KISSBOT_TABLES, is_known_revision
from kissbot.models import oauth_tokens
from kissbot.settings import needed_keys
from kissbot.types import ciphertext, utcnow
from kissbot.verification import database_problems, summary

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
_STARTED = time.time()  # temporary files older than this process, of a process that is gone, are leftovers
_SQLITE_SUFFIXES = ("", "-journal", "-wal", "-shm")


def default_backup_path(db_path: str | os.PathLike[str]) -> Path:
    """``<db_path>.backup_YYYYMMDD_HHMMSS`` (UTC), beside the database.

    If that name is taken (two backups in one second), ``_2``, ``_3``… is
    appended; :func:`backup_sqlite` still refuses to overwrite a file that
    appears in between.
    """
    base = Path(f"{os.fspath(db_path)}.backup_{utcnow():%Y%m%d_%H%M%S}")
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = Path(f"{base}_{n}")
    return candidate


def backup_sqlite(src_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the SQLite database ``src_path`` to ``dest`` consistently, while others may write.

    The copy is made with :meth:`sqlite3.Connection.backup` into a private
    (0600) temporary file beside ``dest``, passes ``PRAGMA integrity_check``,
    is flushed to disk and is then hard-linked to ``dest``, so ``dest`` appears
    complete or not at all. Raises :class:`~kissbot.errors.NoDatabase` if
    ``src_path`` does not exist and :class:`~kissbot.errors.BackupError` if
    ``dest`` exists or the copy fails. Returns ``dest``.
    """
    src_path, dest = Path(src_path), Path(dest)
    if not src_path.is_file():
        raise NoDatabase(f"database {src_path} does not exist")
    _refuse_existing(dest)
    try:
        src = connect_sqlite_query_only(src_path, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open database {src_path}: {exc}") from None
    try:
        _backup_connection(src, dest, src_path)
    finally:
        src.close()
    log.info("backed up %s to %s", src_path, dest)
    return dest


def _backup_connection(src: sqlite3.Connection, dest: Path, source: Path) -> None:
    # backup_sqlite's body, for a caller already holding a connection (and a lock) on the source.
    _refuse_existing(dest)
    # Named after the database, not the dated backup, so the next run finds it if this one is killed.
    tmp = _private_temp_file(dest.with_name(source.name))
    try:
        try:
            copy = sqlite3.connect(tmp, isolation_level=None)
            try:
                # pages=-1: one step, so one read transaction and one snapshot; copying
                # page by page would restart whenever another process commits.
                src.backup(copy, pages=-1)
                # A self-contained file: opening the backup later makes no -wal/-shm beside it.
                copy.execute("PRAGMA journal_mode = DELETE")
                problems = integrity_problems(copy)
            finally:
                copy.close()
        except sqlite3.Error as exc:
            raise BackupError(f"backup of {source} failed: {exc}") from None
        if problems:
            raise BackupError(f"backup of {source} failed its integrity check: {problems[0]}")
        _fsync_file(tmp)
        _install_new(tmp, dest)
    finally:
        _remove_sqlite_files(tmp)


def backup_key(key_file: Path, backup_path: Path) -> Path:
    """Copy the key beside a backup, as ``<backup>.key`` with mode 0600; return its path.

    Anyone holding both files can read every token: keep them apart unless
    you mean to move them together to a safe place.
    """
    dest = Path(f"{backup_path}.key")
    key = read_key_ring(key_file)
    _refuse_existing(dest)
    tmp = _private_temp_file(dest.with_name(key_file.name))  # a killed copy of a key is swept like any other
    try:
        with open(tmp, "wb") as fh:
            fh.write(key.dumps())
            fh.flush()
            os.fsync(fh.fileno())
        _install_new(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore_sqlite` did."""

    tokens_checked: int
    """Users whose tokens were decrypted with the current key before restoring."""
    previous_backup: Path | None
    """The backup of the database that was replaced (None if there was none)."""


def restore_sqlite(
    backup: Path, db_path: Path, cipher: TokenCipher, *, busy_timeout: float = 1.0
) -> RestoreReport:
    """Replace the SQLite database ``db_path`` with the backup file ``backup``.

    The backup is refused (:class:`~kissbot.errors.BackupError`, nothing
    changed) if it fails ``integrity_check``, is not a kissbot database, is at
    a migration this version does not know, or holds a token that ``cipher``
    cannot decrypt. Every bot must be stopped first: if another connection
    holds ``db_path`` within ``busy_timeout`` seconds,
    :class:`~kissbot.errors.DatabaseBusy` is raised. The current database is
    backed up to :func:`default_backup_path` first, then replaced atomically:
    a kill at any moment leaves the old or the new database, whole.
    """
    # A database reached through a symbolic link is restored in place of the
    # link's target; the link stays a link.
    from kissbot.keys import check_key

    backup, db_path = Path(backup), Path(os.path.realpath(db_path))
    if not backup.is_file():
        raise BackupError(f"backup {backup} not found")
    wal = Path(f"{backup}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise BackupError(
            f"{backup} has a {wal.name} beside it: it is a copy of a live database, not a backup; "
            "make one with `kissbot backup`"
        )
    # The backup is checked and sealed in a private copy beside the target, so
    # the backup file is never modified and what was checked is what is swapped in.
    staged = _private_temp_file(db_path)
    try:
        shutil.copyfile(backup, staged)
        engine = sqlalchemy.create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(staged, isolation_level=None), poolclass=StaticPool
        )
        try:
            with engine.connect() as conn:
                check = _check_backup(conn, backup, cipher)
                columns = {c["name"] for c in sqlalchemy.inspect(conn).get_columns("oauth_tokens")}
            # The fingerprints it recorded must match the key, or no command could open it
            # (a backup from before key versions is checked when it is migrated).
            problems = check_key(engine, cipher.ring, "the current key", str(backup)) if "key_version" in columns else []
            if problems:
                raise BackupError(f"{problems[0]}; nothing restored")
            with engine.connect() as conn:
                # Restored in WAL mode, as kissbot makes its stores; closing the last
                # connection folds the -wal back in, so the staged file stays self-contained.
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        except (sqlite3.DatabaseError, DBAPIError) as exc:
            reason = getattr(exc, "orig", None) or exc
            raise BackupError(f"{backup} is not a usable SQLite database ({reason}); nothing restored") from None
        finally:
            engine.dispose()
        _fsync_file(staged)
        previous = None
        if db_path.exists():
            os.chmod(staged, stat.S_IMODE(db_path.stat().st_mode))
            with _exclusive(db_path, busy_timeout) as guard:
                previous = default_backup_path(db_path)
                _backup_connection(guard, previous, db_path)
                # SQLite replays any -wal it finds beside a database, whatever the
                # file's header says, so a -wal of the OLD database left beside the
                # NEW file would write old pages into it. Holding the exclusive lock
                # (no other connection can add a frame), the old database is
                # checkpointed and switched to rollback-journal mode: SQLite folds the
                # -wal into the file and deletes it. From then on both files are
                # standalone and os.replace swaps one whole database for the other; a
                # kill before it leaves the old database (in WAL or rollback mode, both
                # complete), after it the new one. The -shm holds no data (it is
                # rebuilt from the -wal), but a stale one is removed too.
                guard.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                mode = guard.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
                if mode != "delete":
                    raise BackupError(f"cannot take {db_path} out of WAL mode (journal mode {mode}); nothing restored")
                for suffix in ("-wal", "-shm"):
                    Path(f"{db_path}{suffix}").unlink(missing_ok=True)
                os.replace(staged, db_path)
        else:
            os.replace(staged, db_path)
        _fsync_dir(db_path.parent)
    finally:
        _remove_sqlite_files(staged)
    return RestoreReport(tokens_checked=check.checked, previous_backup=previous)


def _check_backup(conn: Connection, backup: Path, cipher: TokenCipher) -> TokenCheck:
    problems = integrity_problems(conn.connection.driver_connection)
    if problems:
        raise BackupError(f"{backup} fails integrity_check ({len(problems)} problems, first: {problems[0]}); nothing restored")
    tables = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
    if not KISSBOT_TABLES <= tables or "alembic_version" not in tables:
        raise BackupError(f"{backup} is not a kissbot database (no kissbot tables or no alembic_version); nothing restored")
    row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    if row is None or not isinstance(row[0], str) or not is_known_revision(row[0]):
        raise BackupError(
            f"{backup} is at migration {row[0] if row else None}, which this kissbot version does not know; nothing restored"
        )
    problems = database_problems(conn, row[0])
    if problems:
        raise BackupError(f"{backup} is not a database kissbot made: {summary(problems)}; nothing restored")
    tokens = oauth_tokens.c
    stored = select(tokens.user_id, ciphertext(tokens.access_token_encrypted), ciphertext(tokens.refresh_token_encrypted))
    check = verify_tokens(conn.execute(stored), cipher)
    if check.failed_user_ids:
        raise BackupError(
            f"{backup}: tokens of {len(check.failed_user_ids)} of {check.checked} users do not decrypt with "
            f"the current key: they need {needed_keys(conn, check.failed_user_ids)}, restore that key from your "
            "backup; nothing restored"
        )
    return check


@contextmanager
def _exclusive(db_path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    # In EXCLUSIVE locking mode the first access takes an exclusive lock on the
    # file and keeps it until close. Every WAL connection holds a shared lock for
    # as long as it is open, so this fails while any bot is connected, even idle.
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open the current database {db_path}: {exc}; nothing restored") from None
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        try:
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise DatabaseBusy(
                    f"database {db_path} is in use by another process: stop every bot using it, then restore"
                ) from None
            raise BackupError(f"cannot open the current database {db_path}: {exc}; nothing restored") from None
        yield conn
    finally:
        conn.close()


def leftovers(beside: Path) -> list[Path]:
    """Temporary files of ``beside`` that a killed backup, restore or import left behind.

    They lie in its folder, named ``.<name>.<pid>.<random>.tmp`` (with
    SQLite's ``-journal``, ``-wal`` or ``-shm``); one counts when the process
    that made it is gone and the file is older than this process.
    """
    pattern = re.compile(re.escape(f".{beside.name}.") + r"(\d+)\.[0-9a-f]{8}\.tmp(?:-journal|-wal|-shm)?")
    try:
        names = sorted(os.listdir(beside.parent))
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _running(int(match[1])):
            continue
        path = beside.with_name(name)
        try:
            if path.lstat().st_mtime < _STARTED:
                found.append(path)
        except OSError:
            continue
    return found


def sweep_leftovers(beside: Path) -> list[Path]:
    """Remove :func:`leftovers` of ``beside``; return what was removed."""
    removed = []
    for path in leftovers(beside):
        try:
            path.unlink()
        except OSError:
            continue
        log.info("removed %s, left behind by an interrupted run", path)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _private_temp_file(beside: Path) -> Path:
    """Create an empty mode-0600 file in ``beside``'s folder, named after it, hidden and unique.

    The :func:`leftovers` of killed runs with that name are swept first.
    """
    sweep_leftovers(beside)
    tmp = beside.with_name(f".{beside.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise BackupError(f"cannot create {beside}: {exc.strerror}") from None
    os.close(fd)
    return tmp


def _install_new(tmp: Path, dest: Path) -> None:
    """Give the complete file ``tmp`` the name ``dest``, refusing to replace anything."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise BackupError(f"backup {dest} already exists") from None
    except OSError as exc:
        raise BackupError(f"cannot create backup {dest}: {exc.strerror}") from None
    _fsync_dir(dest.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_sqlite_files(path: Path) -> None:
    for suffix in _SQLITE_SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _refuse_existing(dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise BackupError(f"backup {dest} already exists")


def prune_backups(db_path: str | os.PathLike[str], directory: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backups of ``db_path`` that kissbot made in ``directory``.

    A backup counts only if it is named as :func:`default_backup_path` names
    them (``<db name>.backup_YYYYMMDD_HHMMSS[_N]``) and is what
    :func:`backup_sqlite` writes: a regular file of this user, mode 0600,
    starting with SQLite's header. Anything else in ``directory`` is never
    touched, nor are the key copies of :func:`backup_key`. Returns the deleted
    paths, oldest first.
    """
    if keep < 1:
        raise ValidationError(f"keep must be at least 1, not {keep}")
    pattern = re.compile(rf"{re.escape(Path(db_path).name)}\.backup_(\d{{8}}_\d{{6}})(?:_(\d+))?")
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is not None and _made_by_backup_sqlite(entry):
                found.append(((match[1], int(match[2] or 1)), Path(entry.path)))
    found.sort()
    gone = [path for _, path in found[:-keep]]
    for path in gone:
        path.unlink()
        log.info("pruned backup %s", path)
    return gone


def _made_by_backup_sqlite(entry: os.DirEntry[str]) -> bool:
    if not entry.is_file(follow_symlinks=False):
        return False
    info = entry.stat(follow_symlinks=False)
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o600:
        return False
    with open(entry.path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"
