"""Build the SQLAlchemy engine of a store from a path or URL.

On SQLite, a ``connect`` event sets the specification's pragmas and turns off
the driver's own transaction handling; a ``begin`` event (SQLAlchemy's
documented recipe for pysqlite) then starts each transaction with ``BEGIN``
(reads, which never take the write lock) or, on the :func:`writer` engine and
in :func:`write_transaction`, ``BEGIN IMMEDIATE``, so concurrent writers wait
up to ``busy_timeout`` instead of failing with SQLITE_BUSY when they upgrade a
read lock. On a :func:`read_connection` no transaction is opened at all: each
statement is its own (one round trip). On PostgreSQL every session gets the
same wait as ``lock_timeout``.
Driver errors are mapped by :mod:`kissbot.dberrors`; paths and URLs are read
by :mod:`kissbot.urls`.

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
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.pool import StaticPool

from kissbot import dberrors
from kissbot.crypto import TokenCipher
from kissbot.errors import ConfigurationError, ValidationError
from kissbot.types import attach_cipher
from kissbot.urls import is_memory, sqlite_path, to_url
from kissbot import validation as check

DEFAULT_DB_PATH = "kissbot.db"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
SYNCHRONOUS_ENV = "KISSBOT_SQLITE_SYNCHRONOUS"
DEFAULT_SYNCHRONOUS = "NORMAL"
DEFAULT_BUSY_TIMEOUT_MS = 5000
MAX_BUSY_TIMEOUT_MS = 2**31 - 1
"""Longest lock wait: SQLite's busy_timeout and PostgreSQL's lock_timeout are 32-bit milliseconds."""
_WRITE = {"kissbot_write": True}
"""The execution option that makes a SQLite transaction begin with ``BEGIN IMMEDIATE``."""
_AUTOCOMMIT = "kissbot_autocommit"
"""The execution option that makes the SQLite ``begin`` listener send nothing (see :func:`read_connection`)."""
SQL_LOG = logging.getLogger("kissbot.sql")


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
    check.check_count(busy_timeout_ms, "busy_timeout_ms", 0, MAX_BUSY_TIMEOUT_MS)
    if echo not in (True, False, "debug"):
        raise ValidationError(f"echo must be True, False or 'debug', not {check.echo(echo)}")
    kwargs.setdefault("hide_parameters", True)
    memory = is_memory(url)
    if memory:
        kwargs.setdefault("poolclass", StaticPool)
        kwargs.setdefault("connect_args", {"check_same_thread": False})
    engine = sqlalchemy.create_engine(url, echo=echo, **kwargs)
    if engine.dialect.name == "sqlite":
        _sqlite_sessions(engine, synchronous, busy_timeout_ms)
    else:
        _postgresql_sessions(engine, busy_timeout_ms)
    dberrors.install(engine, busy_timeout_ms)
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
    mode = value.strip().upper() if isinstance(value, str) else None
    if mode not in SYNCHRONOUS_MODES:
        raise ConfigurationError(f"{source} must be one of {', '.join(SYNCHRONOUS_MODES)}, not {check.echo(value)}")
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


def writer(engine: Engine) -> Engine:
    """Return ``engine`` set up for write transactions (``BEGIN IMMEDIATE`` on SQLite).

    The returned engine shares the pool, dialect and key of ``engine``; bind a
    :class:`~sqlalchemy.orm.Session` to it for writes.
    """
    return engine.execution_options(**_WRITE)


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection of ``engine`` that reads outside any transaction: each statement commits on its own.

    A one-statement read is then one round trip, without ``BEGIN`` and
    ``ROLLBACK`` around it: on PostgreSQL the connection is in autocommit
    (``isolation_level="AUTOCOMMIT"``, with the session's ``lock_timeout``),
    and on SQLite, whose driver-level transaction handling is off, no
    ``BEGIN`` is sent. Each statement of a longer read sees the commits made
    before it.
    """
    with engine.connect() as conn:
        yield conn.execution_options(**_read_options(engine))


def _read_options(engine: Engine) -> dict[str, Any]:
    return {_AUTOCOMMIT: True} if engine.dialect.name == "sqlite" else {"isolation_level": "AUTOCOMMIT"}


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection of ``engine`` in a write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success.

    The transaction begins with the first statement, once its parameters are
    bound (tokens encrypted): the checks and encryption before it do not hold
    SQLite's write lock.
    """
    with engine.connect() as conn:
        yield conn.execution_options(**_WRITE)
        conn.commit()


class HeldConnection:
    """The one connection of ``engine`` a :class:`~kissbot.manager.DatabaseManager` keeps between its calls.

    Each use of a fresh connection (:func:`read_connection`,
    :func:`write_transaction`) pays a pool checkout, SQLAlchemy's set-up of the
    connection's events and a check-in: as much CPU as a one-row read itself.
    :meth:`read` and :meth:`write` give the held connection instead, to one
    thread at a time; a thread that finds it in use gets a fresh connection of
    the pool, so threads never wait for each other here. Between uses it is in
    no transaction: a read runs outside one (as on :func:`read_connection`), a
    write transaction (as in :func:`write_transaction`) is committed at the end
    of its use. A use that raises closes it (rolling back what it began) and
    the next use opens a new one; so does the next use after any connection of
    the engine lost the server (a restart ended every session), as SQLAlchemy's
    pool replaces its connections then. After ``os.fork()`` the child forgets
    an inherited one as the engine forgets its pool.
    """

    __slots__ = ("_engine", "_lock", "_conn", "_writing", "_stale", "__weakref__")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._writing: bool | None = None
        self._stale = False
        event.listen(engine, "handle_error", self._on_error)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=functools.partial(_forget_inherited, weakref.ref(self)))

    def read(self) -> AbstractContextManager[Connection]:
        """The connection, reading outside any transaction (see :func:`read_connection`)."""
        return self._use(write=False)

    def write(self) -> AbstractContextManager[Connection]:
        """The connection in a write transaction, committed on success (see :func:`write_transaction`)."""
        return self._use(write=True)

    @contextmanager
    def _use(self, write: bool) -> Iterator[Connection]:
        if not self._lock.acquire(blocking=False):
            with (write_transaction if write else read_connection)(self._engine) as conn:
                yield conn
            return
        try:
            conn = self._conn
            if conn is not None and self._stale:
                conn.invalidate()  # its session may be gone: closed without a word to the server
                conn.close()
                conn = self._conn = None
            if conn is None:
                self._stale = False
                conn = self._conn = self._engine.connect()
                self._writing = None
            if write is not self._writing:
                conn.rollback()  # the reads' SQLAlchemy-level transaction: nothing was begun in the database
                conn.execution_options(**self._options(conn, write))
                self._writing = write
            try:
                yield conn
                if write:
                    conn.commit()
            except BaseException:
                self._conn = None
                conn.close()
                raise
        finally:
            self._lock.release()

    def _options(self, conn: Connection, write: bool) -> dict[str, Any]:
        if self._engine.dialect.name == "sqlite":
            return {_AUTOCOMMIT: not write, "kissbot_write": write}
        return {"isolation_level": conn.default_isolation_level if write else "AUTOCOMMIT"}

    def close(self) -> None:
        """Close the held connection (returned to the pool); the next use opens a new one."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _on_error(self, context: ExceptionContext) -> None:
        if context.is_disconnect:
            self._stale = True

    def _forget(self) -> None:
        # In a freshly forked child, as _drop_inherited_connections: the
        # parent's connection is dropped, and closed on SQLite only.
        self._lock = threading.Lock()
        conn, self._conn = self._conn, None
        if conn is not None and self._engine.dialect.name == "sqlite":
            conn.invalidate()


def _forget_inherited(ref: weakref.ref[HeldConnection]) -> None:
    held = ref()
    if held is not None:
        held._forget()


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
            if dberrors.sqlite_code(exc) not in dberrors.SQLITE_BUSY_CODES or time.monotonic() >= deadline:
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


def _sqlite_sessions(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    path = sqlite_path(engine.url)
    if path is not None:

        @event.listens_for(engine, "do_connect")
        def _create_private(*_args: Any) -> None:
            create_private_file(path)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own BEGIN handling off: the "begin" listener below says when and how.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _ensure_wal(cursor, busy_timeout_ms)
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(_AUTOCOMMIT):
            return
        # Straight to the driver: BEGIN returns nothing, and a SQLAlchemy execution around it cost
        # as much per transaction as the statement that follows. Errors are mapped as handle_error does.
        try:
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE" if options.get("kissbot_write") else "BEGIN")
        except sqlite3.Error as exc:
            mapped = dberrors.sqlite_error(exc, path, busy_timeout_ms)
            if mapped is None:
                raise
            raise mapped from exc


def _postgresql_sessions(engine: Engine, lock_timeout_ms: int) -> None:
    @event.listens_for(engine, "do_connect")
    def _on_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        # A session waits for a lock as long as a SQLite writer would, then fails with DatabaseBusy.
        cparams["options"] = f"{cparams.get('options', '')} -c lock_timeout={int(lock_timeout_ms)}".strip()
