"""Driver errors a caller can act on, as one-line :class:`~kissbot.errors.DatabaseError` subclasses.

:func:`install` adds a ``handle_error`` listener to a store's engine: a
:class:`~kissbot.errors.KissbotError` raised while binding (a naive datetime,
a missing key) reaches the caller as itself; a lock held past the wait limit
becomes :class:`~kissbot.errors.DatabaseBusy`; a server that is down or drops
the connection becomes :class:`~kissbot.errors.DatabaseUnavailable`; a SQLite
file that cannot be opened or is damaged becomes
:class:`~kissbot.errors.DatabaseError`. Each is raised from the driver's error.
Constraint and SQL errors are left to the caller.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from kissbot.errors import DatabaseBusy, DatabaseError, DatabaseUnavailable, KissbotError, driver_message
from kissbot.urls import shown, sqlite_path

# SQLite primary result codes (sqlite3 only names them from Python 3.11).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26
SQLITE_BUSY_CODES = frozenset({_BUSY, _LOCKED})
_SQLITE_OPEN_CODES = frozenset({_CANTOPEN, _READONLY, _PERM})
_SQLITE_DAMAGE_CODES = frozenset({_CORRUPT, _NOTADB})
_SQLITE_MESSAGES = {
    "database is locked": _BUSY,
    "database table is locked": _LOCKED,
    "unable to open database file": _CANTOPEN,
    "attempt to write a readonly database": _READONLY,
    "file is not a database": _NOTADB,
    "database disk image is malformed": _CORRUPT,
    "database or disk is full": _FULL,
    "disk I/O error": _IOERR,
}
# PostgreSQL SQLSTATEs: lock_timeout / statement_timeout, and a server going away under a session.
_PG_BUSY_STATES = frozenset({"55P03", "57014"})
_PG_GONE_STATES = frozenset({"57P01", "57P02", "57P03"})


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of a :mod:`sqlite3` error (from its message on old Pythons)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return _SQLITE_MESSAGES.get(str(exc)) if code is None else code & 0xFF


def sqlite_error(exc: BaseException, path: Path | None, busy_timeout_ms: int | None = None) -> DatabaseError | None:
    """The :class:`DatabaseError` a SQLite driver error means for ``path``, or None.

    A lock held past the busy timeout becomes :class:`DatabaseBusy` with the
    specification's troubleshooting hint; a file that cannot be opened (a
    read-only directory, where WAL cannot create its ``-wal``/``-shm`` files) or
    that is not an intact SQLite database gets a message naming it. Other
    errors (constraints, SQL errors) are left alone.
    """
    if not isinstance(exc, sqlite3.Error) or isinstance(exc, sqlite3.IntegrityError):
        return None
    code = sqlite_code(exc)
    where = str(path) if path is not None else "in memory"
    if code in SQLITE_BUSY_CODES:
        waited = f" for more than {busy_timeout_ms} ms" if busy_timeout_ms is not None else ""
        return DatabaseBusy(
            f"database {where} is locked: another connection held it{waited}; check the bot processes with "
            f'`ps aux | grep "main.py\\|supervisor"` and force a WAL checkpoint with '
            f'`sqlite3 {where} "PRAGMA wal_checkpoint(RESTART);"`'
        )
    if code == _FULL or (code == _IOERR and path is not None and _disk_full(path)):
        return DatabaseError(f"cannot write database {where}: the disk is full; free some space and run it again")
    if code in _SQLITE_OPEN_CODES:
        if path is not None and not path.parent.is_dir():
            return DatabaseError(f"cannot open database {where}: directory {path.parent} does not exist")
        if path is not None and not os.access(path.parent, os.W_OK):
            return DatabaseError(
                f"cannot open database {where}: its directory is not writable, and SQLite's WAL mode must create "
                f"{path.name}-wal and {path.name}-shm beside it"
            )
        return DatabaseError(f"cannot open database {where}: {exc}")
    if code in _SQLITE_DAMAGE_CODES:
        return DatabaseError(f"database {where} is damaged or not a SQLite database ({exc}); restore it from a backup")
    return None


def _disk_full(path: Path) -> bool:
    # SQLite reports a write that found no space while creating -wal/-shm as a mere I/O error.
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def postgresql_error(context: Any, where: str, lock_timeout_ms: int) -> DatabaseError | None:
    """The :class:`DatabaseError` a PostgreSQL driver error means (``context``: SQLAlchemy's ExceptionContext), or None."""
    from psycopg import OperationalError

    exc = context.original_exception
    state = getattr(exc, "sqlstate", None)
    if state in _PG_BUSY_STATES:
        return DatabaseBusy(
            f"database {where} is busy: another session held a lock for more than {lock_timeout_ms} ms; "
            "look for stuck sessions in pg_stat_activity"
        )
    if context.is_disconnect or state in _PG_GONE_STATES or (
        isinstance(exc, OperationalError) and (state is None or state.startswith("08"))
    ):
        return DatabaseUnavailable(f"cannot open database {where}: {driver_message(exc)}")
    return None


def install(engine: Engine, wait_ms: int) -> None:
    """Map ``engine``'s driver errors as the module says; ``wait_ms`` is the lock wait named in messages."""
    path = sqlite_path(engine.url)
    where = str(path) if path is not None else engine.url.database or shown(engine.url)
    postgresql = engine.dialect.name == "postgresql"

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> BaseException | None:
        if isinstance(context.original_exception, KissbotError):
            return context.original_exception
        if postgresql:
            return postgresql_error(context, where, wait_ms)
        return sqlite_error(context.original_exception, path, wait_ms)
