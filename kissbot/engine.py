"""Build the SQLAlchemy engine of a store from a path or URL.

On SQLite, a ``connect`` event sets the specification's pragmas and turns off
the driver's own transaction handling; a ``begin`` event then emits ``BEGIN``
(reads, which never take the write lock) or ``BEGIN IMMEDIATE`` on the
:func:`writer` engine, so concurrent writers wait up to ``busy_timeout``
instead of failing with SQLITE_BUSY when they upgrade a read lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from kissbot.crypto import TokenCipher
from kissbot.errors import KissbotError
from kissbot.types import attach_cipher

DEFAULT_DB_PATH = "kissbot.db"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
_IMMEDIATE = "kissbot_begin_immediate"
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
    synchronous: str = "NORMAL",
    busy_timeout_ms: int = 5000,
    **kwargs: Any,
) -> Engine:
    """Create the engine of a store.

    ``target`` is a SQLite file path or any SQLAlchemy URL. ``cipher`` is the
    store's key; without one, token columns cannot be read or written.
    In-memory SQLite shares one connection so every session sees one database.
    """
    url = to_url(target)
    synchronous = synchronous.upper()
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "sqlite":
        if is_memory(url):
            kwargs.setdefault("poolclass", StaticPool)
            kwargs.setdefault("connect_args", {"check_same_thread": False})
        engine = sqlalchemy.create_engine(url, echo=echo, **kwargs)
        _install_sqlite_events(engine, synchronous, busy_timeout_ms)
    else:
        engine = sqlalchemy.create_engine(url, echo=echo, **kwargs)
    event.listen(engine, "handle_error", _reraise_kissbot_errors)
    if SQL_LOG.isEnabledFor(logging.DEBUG):
        event.listen(engine, "before_cursor_execute", _log_statement)
    if cipher is not None:
        attach_cipher(engine, cipher)
    return engine


def _log_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    # The specification's debug mode (logging at DEBUG shows every query).
    # SQLAlchemy's own logger stays at WARNING unless echo is set; this logs
    # statements only, never their parameters.
    SQL_LOG.debug("%s", statement)


def _reraise_kissbot_errors(context: Any) -> BaseException | None:
    # A KissbotError raised while binding parameters (a naive datetime, a
    # missing key) reaches the caller as itself, not wrapped in StatementError.
    if isinstance(context.original_exception, KissbotError):
        return context.original_exception
    return None


def writer(engine: Engine) -> Engine:
    """Return ``engine`` set up for write transactions (``BEGIN IMMEDIATE`` on SQLite).

    The returned engine shares the pool, dialect and key of ``engine``.
    """
    return engine.execution_options(**{_IMMEDIATE: True})


def _install_sqlite_events(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
