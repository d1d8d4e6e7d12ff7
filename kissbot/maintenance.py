"""Database upkeep without the ``sqlite3`` shell: the specification's "Optimisation".

Each function takes a store's engine (see :func:`open_existing`). ``VACUUM``
and ``ANALYZE`` run on SQLite and PostgreSQL; the WAL checkpoint and
``integrity_check`` exist on SQLite only and raise
:class:`~kissbot.errors.UnsupportedBackend` elsewhere.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.engine import URL, Engine

from kissbot.engine import create_engine
from kissbot.urls import existing_store
from kissbot.errors import DatabaseError, UnsupportedBackend, ValidationError
from kissbot.migrations import KISSBOT_TABLES, read_only_engine

CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")


@dataclass(frozen=True)
class CheckpointResult:
    """The three numbers ``PRAGMA wal_checkpoint`` returns."""

    busy: bool
    """True if a reader or writer kept the checkpoint from completing (FULL/RESTART/TRUNCATE)."""
    log_frames: int
    """Frames in the WAL (-1 if the database is not in WAL mode)."""
    checkpointed_frames: int
    """Frames copied back into the database file (-1 if not in WAL mode)."""


def open_existing(target: str | os.PathLike[str] | URL, *, read_only: bool = False) -> Engine:
    """An engine on an existing database; unlike opening a store, never creates a SQLite file.

    Raises :class:`~kissbot.errors.NoDatabase` for a missing file and
    :class:`~kissbot.errors.DatabaseError` for an in-memory URL. The engine has no key: it cannot read tokens.
    With ``read_only`` it cannot write either, nor switch a SQLite file to WAL
    (:func:`~kissbot.migrations.read_only_engine`).
    """
    url = existing_store(target, DatabaseError("an in-memory database cannot be maintained: pass --db PATH or --url URL"))
    return read_only_engine(url) if read_only else create_engine(url)


def vacuum(engine: Engine) -> None:
    """Rebuild the database to reclaim free pages (``VACUUM``)."""
    _run_outside_transaction(engine, "VACUUM")


def analyze(engine: Engine) -> None:
    """Refresh the statistics the query planner uses to pick indexes (``ANALYZE``)."""
    _run_outside_transaction(engine, "ANALYZE")


def checkpoint(engine: Engine, mode: str = "PASSIVE") -> CheckpointResult:
    """Copy the WAL back into the database file (``PRAGMA wal_checkpoint(mode)``); SQLite only.

    ``TRUNCATE`` also empties the ``-wal`` file once no reader needs it;
    ``RESTART`` and ``TRUNCATE`` wait (``busy_timeout``) for writers to finish.
    """
    mode = mode.upper()
    if mode not in CHECKPOINT_MODES:
        raise ValidationError(f"checkpoint mode must be one of {', '.join(CHECKPOINT_MODES)}, not {mode!r}")
    _require_sqlite(engine, "checkpoint")
    with _sqlite_driver(engine) as raw:
        busy, log, done = raw.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return CheckpointResult(bool(busy), log, done)


def integrity_check(engine: Engine) -> list[str]:
    """The problems ``PRAGMA integrity_check`` finds, ``[]`` for a sound database; SQLite only."""
    _require_sqlite(engine, "integrity")
    with _sqlite_driver(engine) as raw:
        return integrity_problems(raw)


def integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """Run ``PRAGMA integrity_check`` on a driver connection: one line per problem, ``[]`` if sound."""
    lines = [
        line
        for (row,) in conn.execute("PRAGMA integrity_check")
        for line in str(row).splitlines()
        if not line.startswith("*** in database")  # a heading, not a problem
    ]
    return [] if lines == ["ok"] else lines


def _run_outside_transaction(engine: Engine, command: str) -> None:
    # VACUUM may not run inside a transaction: the SQLite driver connection of a
    # kissbot engine is in autocommit, PostgreSQL needs AUTOCOMMIT asked for.
    if engine.dialect.name == "sqlite":
        with _sqlite_driver(engine) as raw:
            raw.execute(command)
        return
    with engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        autocommit.exec_driver_sql(f"{command} {', '.join(sorted(KISSBOT_TABLES | {'alembic_version'}))}")


@contextmanager
def _sqlite_driver(engine: Engine) -> Iterator[sqlite3.Connection]:
    # The driver connection itself (autocommit, see engine.py), its errors as kissbot's.
    with engine.connect() as conn:
        try:
            yield conn.connection.driver_connection
        except sqlite3.Error as exc:
            raise DatabaseError(f"database {engine.url.database}: {exc}") from exc


def _require_sqlite(engine: Engine, what: str) -> None:
    if engine.dialect.name != "sqlite":
        raise UnsupportedBackend(f"maintenance {what} is SQLite-only; PostgreSQL manages its WAL and checks pages itself")
