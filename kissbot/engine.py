"""Build the SQLAlchemy engine of a store from a path or URL.

On SQLite, a ``connect`` event sets the specification's pragmas and turns off
the driver's own transaction handling; each transaction then begins with
``BEGIN`` (reads, which never take the write lock) or, on the :func:`writer`
engine and in :func:`write_transaction`, ``BEGIN IMMEDIATE``, so concurrent
writers wait up to ``busy_timeout`` instead of failing with SQLITE_BUSY when
they upgrade a read lock. SQLite errors a caller can act on (a lock held past
``busy_timeout``, a file that cannot be opened or is not a database) become
one-line :class:`DatabaseError` subclasses raised from the driver's error.

An engine made before ``os.fork()`` stays usable in the child: the child drops
the pooled connections it inherited and opens its own (SQLAlchemy's
``dispose(close=False)`` pattern; on SQLite the inherited handles are closed
in the child so SQLite's per-process lock bookkeeping starts afresh).
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from kissbot.crypto import TokenCipher
from kissbot.errors import ConfigurationError, DatabaseBusy, DatabaseError, KissbotError
from kissbot.types import attach_cipher

DEFAULT_DB_PATH = "kissbot.db"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
SYNCHRONOUS_ENV = "KISSBOT_SQLITE_SYNCHRONOUS"
DEFAULT_SYNCHRONOUS = "NORMAL"
DEFAULT_BUSY_TIMEOUT_MS = 5000
_IMMEDIATE = "kissbot_begin_immediate"
_READ_CACHE = "kissbot_read_cache"
SQL_LOG = logging.getLogger("kissbot.sql")


def to_url(target: str | os.PathLike[str] | URL) -> URL:
    """Turn a database path or URL into a SQLAlchemy :class:`URL`."""
    if isinstance(target, URL):
        return target
    text = os.fspath(target)
    if "://" in text:
        return make_url(text)
    if text == ":memory:":
        return make_url("sqlite://")
    return URL.create("sqlite", database=text)


def is_memory(url: URL) -> bool:
    """True for an in-memory SQLite URL."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def sqlite_path(url: URL) -> Path | None:
    """The file of a file-backed SQLite URL, else None."""
    if url.get_backend_name() != "sqlite" or is_memory(url):
        return None
    return Path(url.database)


def connect_sqlite_query_only(path: str | os.PathLike[str], timeout: float = 5.0) -> sqlite3.Connection:
    """A plain :mod:`sqlite3` connection to an existing file that cannot write to it.

    It opens read-write without creating (``mode=rw``) and sets
    ``PRAGMA query_only``: unlike a ``mode=ro`` connection, which leaves the
    ``-wal`` and ``-shm`` files of a WAL database behind, it removes them when
    it is the last to close, so looking at a database leaves its directory as
    it was. A file that cannot be opened read-write is opened ``mode=ro``.
    """
    uri = Path(path).resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=timeout)
    except sqlite3.OperationalError:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout)
    try:
        conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def create_engine(
    target: str | os.PathLike[str] | URL = DEFAULT_DB_PATH,
    *,
    cipher: TokenCipher | None = None,
    echo: bool = False,
    synchronous: str | None = None,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    **kwargs: Any,
) -> Engine:
    """Create the engine of a store.

    ``target`` is a SQLite file path or any SQLAlchemy URL. ``cipher`` is the
    store's key; without one, token columns cannot be read or written.
    In-memory SQLite shares one connection so every session sees one database.

    On SQLite, ``synchronous`` (default: ``$KISSBOT_SQLITE_SYNCHRONOUS``, else
    ``NORMAL``) trades durability for speed: with ``NORMAL`` a power loss can
    drop the last commits (a just-rotated refresh token then needs a reauth),
    ``FULL`` syncs every commit. A write waits up to ``busy_timeout_ms`` for
    the lock before raising :class:`~kissbot.errors.DatabaseBusy`.
    """
    url = to_url(target)
    synchronous = synchronous_mode(synchronous)
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "sqlite":
        memory = is_memory(url)
        if memory:
            kwargs.setdefault("poolclass", StaticPool)
            kwargs.setdefault("connect_args", {"check_same_thread": False})
        engine = sqlalchemy.create_engine(url, echo=echo, **kwargs)
        _install_sqlite_events(engine, synchronous, busy_timeout_ms)
    else:
        memory = False
        engine = sqlalchemy.create_engine(url, echo=echo, **kwargs)
        event.listen(engine, "handle_error", _reraise_kissbot_errors)
    if SQL_LOG.isEnabledFor(logging.DEBUG):
        event.listen(engine, "before_cursor_execute", _log_statement)
    if not memory and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=functools.partial(_drop_inherited_connections, weakref.ref(engine)))
    if cipher is not None:
        attach_cipher(engine, cipher)
    return engine


def _log_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    # The specification's debug mode (logging at DEBUG shows every query).
    # SQLAlchemy's own logger stays at WARNING unless echo is set; this logs
    # statements only, never their parameters.
    SQL_LOG.debug("%s", statement)


def synchronous_mode(value: str | None = None) -> str:
    """The SQLite ``synchronous`` mode to use: ``value``, else ``$KISSBOT_SQLITE_SYNCHRONOUS``, else NORMAL.

    Raises :class:`~kissbot.errors.ConfigurationError` for a mode SQLite does not know.
    """
    source = "synchronous"
    if value is None:
        value, source = os.environ.get(SYNCHRONOUS_ENV) or DEFAULT_SYNCHRONOUS, SYNCHRONOUS_ENV
    mode = value.strip().upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ConfigurationError(f"{source} must be one of {', '.join(SYNCHRONOUS_MODES)}, not {value!r}")
    return mode


def _drop_inherited_connections(ref: weakref.ref[Engine]) -> None:
    # Runs in a freshly forked child: the pooled connections belong to the
    # parent. PostgreSQL ones are only dereferenced (closing them would end
    # the parent's sessions; psycopg does not close them on garbage
    # collection in another process). SQLite ones are closed: SQLite keeps its
    # file-lock state per process, and a copy inherited from the parent would
    # make the child's own connections skip taking real locks.
    engine = ref()
    if engine is not None:
        engine.dispose(close=engine.dialect.name == "sqlite")


def _reraise_kissbot_errors(context: Any) -> BaseException | None:
    # A KissbotError raised while binding parameters (a naive datetime, a
    # missing key) reaches the caller as itself, not wrapped in StatementError.
    if isinstance(context.original_exception, KissbotError):
        return context.original_exception
    return None


def writer(engine: Engine) -> Engine:
    """Return ``engine`` set up for write transactions (``BEGIN IMMEDIATE`` on SQLite).

    The returned engine shares the pool, dialect and key of ``engine``; bind a
    :class:`~sqlalchemy.orm.Session` to it for writes. For one write
    transaction, :func:`write_transaction` is cheaper.
    """
    immediate = engine.execution_options()
    if engine.dialect.name == "sqlite":
        event.listen(immediate, "begin", _mark_immediate)
    return immediate


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection of ``engine`` in a write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            _mark_immediate(conn)
        with conn.begin():
            yield conn


def _mark_immediate(conn: Connection) -> None:
    # Read (and reset) by _sqlite_begin when this connection's transaction begins.
    conn.connection.info[_IMMEDIATE] = True


def _sqlite_begin(dbapi_connection: Any) -> None:
    # The dialect's do_begin hook, set on each SQLite engine's dialect. A
    # "begin" event listener on the engine would do the same, but any
    # connection event makes every Connection of the engine join the event
    # dispatch, which more than doubled the cost of a one-query read; errors
    # here are wrapped like those of any statement.
    statement = "BEGIN IMMEDIATE" if dbapi_connection.info.pop(_IMMEDIATE, False) else "BEGIN"
    dbapi_connection.driver_connection.execute(statement)
    if SQL_LOG.isEnabledFor(logging.DEBUG):
        SQL_LOG.debug("%s", statement)


# SQLite primary result codes (sqlite3 only names them from Python 3.11).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26
_SQLITE_BUSY_CODES = frozenset({_BUSY, _LOCKED})
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
    code = getattr(exc, "sqlite_errorcode", None)
    code = _SQLITE_MESSAGES.get(str(exc)) if code is None else code & 0xFF
    where = str(path) if path is not None else "in memory"
    if code in _SQLITE_BUSY_CODES:
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


def _ensure_wal(cursor: sqlite3.Cursor, busy_timeout_ms: int) -> None:
    # WAL is persistent, so it is only switched on once per file. The switch
    # needs an exclusive lock and SQLite reports SQLITE_BUSY at once, without
    # its busy handler, when another process holds the new file (several bots
    # creating one store together): retry it within the busy timeout.
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            code = _SQLITE_MESSAGES.get(str(exc)) if code is None else code & 0xFF
            if code not in _SQLITE_BUSY_CODES or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (an empty file is an empty SQLite database).

    SQLite would create a database 0644 (less the umask), and gives its
    ``-wal`` and ``-shm`` files the database's mode: tokens are encrypted, but
    logins, audit events and the WAL's copies of them are nobody else's business.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        return  # it exists, or SQLite reports why it cannot be opened
    os.close(fd)


def _install_sqlite_events(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    path = sqlite_path(engine.url)

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> BaseException | None:
        return _reraise_kissbot_errors(context) or sqlite_error(context.original_exception, path, busy_timeout_ms)

    if path is not None:

        @event.listens_for(engine, "do_connect")
        def _create_private(*_args: Any) -> None:
            create_private_file(path)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _ensure_wal(cursor, busy_timeout_ms)
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    engine.dialect.do_begin = _sqlite_begin  # type: ignore[method-assign]


def read_cache(conn: Connection) -> dict[Any, Any] | None:
    """A cache of values read on ``conn``, valid for the committed state it sees now; None off SQLite.

    The dict belongs to the pooled SQLite connection. It is emptied whenever
    ``PRAGMA data_version`` shows that another connection (of this process or
    any other) committed since it was filled, or this connection's
    ``total_changes`` shows that it wrote rows itself (its own commits leave its
    data_version unchanged). Call it before the connection's transaction
    begins; values put in it must have been read after the call.
    """
    if conn.dialect.name != "sqlite":
        return None
    fairy = conn.connection
    driver = fairy.driver_connection
    try:
        version = (driver.execute("PRAGMA data_version").fetchone()[0], driver.total_changes)
    except sqlite3.Error:
        return None  # no cache this time: the query that follows reports the problem as usual
    entry = fairy.info.get(_READ_CACHE)
    if entry is None or entry[0] != version:
        entry = fairy.info[_READ_CACHE] = (version, {})
    return entry[1]
