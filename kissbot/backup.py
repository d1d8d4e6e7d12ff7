"""Consistent online backups of a SQLite store.

A live SQLite database in WAL mode is spread over ``kissbot.db``,
``kissbot.db-wal`` and ``kissbot.db-shm``; copying the files while bots write
can give a torn copy. :func:`backup_sqlite` instead reads the database through
SQLite's online backup API in one step (one consistent snapshot, while other
processes keep writing), checks the copy with ``PRAGMA integrity_check``, and
only then puts it in place, with mode 0600, as one complete file. The key file
is never copied beside it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from kissbot.engine import connect_sqlite_query_only
from kissbot.errors import BackupError, NoDatabase
from kissbot.types import utcnow

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0


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
    if dest.exists() or dest.is_symlink():
        raise BackupError(f"backup {dest} already exists")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise BackupError(f"cannot create backup {dest}: {exc.strerror}") from None
    os.close(fd)
    try:
        _copy(src_path, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise BackupError(f"backup {dest} already exists") from None
        except OSError as exc:
            raise BackupError(f"cannot create backup {dest}: {exc.strerror}") from None
        _fsync_dir(dest.parent)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
    log.info("backed up %s to %s", src_path, dest)
    return dest


def _copy(src_path: Path, tmp: Path) -> None:
    try:
        src = connect_sqlite_query_only(src_path, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open database {src_path}: {exc}") from None
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
            # A self-contained file: opening the backup later makes no -wal/-shm beside it.
            dst.execute("PRAGMA journal_mode = DELETE")
            result = [row[0] for row in dst.execute("PRAGMA integrity_check")]
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {src_path} failed: {exc}") from None
    finally:
        src.close()
    if result != ["ok"]:
        raise BackupError(f"backup of {src_path} failed its integrity check: {result[0]}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
