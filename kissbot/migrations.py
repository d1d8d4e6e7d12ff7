"""Alembic owns the schema: run its migrations on a store's engine.

The migration scripts live in the repository's top-level ``alembic/`` folder
and ship inside the wheel as ``kissbot/_alembic``, so an installed package can
migrate a database with no checkout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import sqlite3
from pathlib import Path

import sqlalchemy
from sqlalchemy import inspect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool
from sqlalchemy.exc import SQLAlchemyError

from kissbot.engine import connect_sqlite_query_only, create_engine, writer
from kissbot.dberrors import sqlite_error
from kissbot.urls import sqlite_path
from kissbot.errors import DatabaseError, NoDatabase, OutdatedSchema, SchemaError, UnversionedDatabase, driver_message

HEAD = "0005"
"""The newest revision this version of kissbot knows (checked against the scripts by the tests)."""

KISSBOT_TABLES = frozenset({"users", "oauth_tokens", "instances", "audit_log", "config"})
_PG_MIGRATION_LOCK = 0x6B697373  # "kiss": serialises concurrent migrations on PostgreSQL


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``."""
    packaged = Path(__file__).with_name("_alembic")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(connection: Connection | None = None):  # -> alembic.config.Config
    """An Alembic :class:`~alembic.config.Config` for the packaged scripts."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction suited to schema changes.

    On SQLite, foreign keys are switched off for the transaction (batch
    migrations recreate tables, which must not cascade) and checked before
    commit; on PostgreSQL an advisory lock serialises concurrent migrators.
    """
    with writer(engine).connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        raw = conn.connection.driver_connection
        if sqlite:
            raw.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("SET LOCAL lock_timeout = 0")  # wait for another migrator, however long
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
                yield conn
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise SchemaError("migration left rows that break a foreign key; nothing was changed")
        finally:
            if sqlite:
                raw.execute("PRAGMA foreign_keys = ON")


def current_revision(conn: Connection) -> str | None:
    """The Alembic revision the database is at, or None if it has none."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite_header(path: Path) -> None:
    # A file that is not SQLite, or shorter than its header says, is refused
    # before SQLite opens it: SQLite would create -wal/-shm files beside it.
    # Without a -wal file, the database file holds every page it counts.
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise DatabaseError(f"cannot open database {path}: {exc.strerror}") from exc
    if not header.startswith(_SQLITE_MAGIC):
        raise DatabaseError(f"cannot open database {path}: not a SQLite database")
    if len(header) < 100:
        raise DatabaseError(f"cannot open database {path}: truncated to {len(header)} bytes; restore it from a backup")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]
    wal = Path(f"{path}-wal")
    if header_valid and not (wal.exists() and wal.stat().st_size > 0):
        size = path.stat().st_size
        if size < pages * page_size:
            raise DatabaseError(
                f"cannot open database {path}: truncated, it holds {size} of its {pages * page_size} bytes; "
                "restore it from a backup"
            )


def _probe_sqlite_file(path: Path) -> tuple[str | None, set[str]]:
    # Read-only look at an existing file before any engine connects: the
    # engine's connect event switches the file to WAL, which would modify a
    # database that kissbot is about to refuse.
    _check_sqlite_header(path)
    try:
        conn = connect_sqlite_query_only(path)
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path) or DatabaseError(f"cannot open database {path}: {exc}") from exc
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = revision[0] if revision else None
        return revision, tables
    except sqlite3.DatabaseError as exc:
        raise sqlite_error(exc, path) or DatabaseError(f"cannot open database {path}: {exc}") from exc
    finally:
        conn.close()


def _state(engine: Engine) -> tuple[str | None, set[str]]:
    path = sqlite_path(engine.url)
    if path is not None and path.exists():
        if path.stat().st_size == 0:
            return None, set()  # an empty database, left as it is: connecting would make it a WAL file
        return _probe_sqlite_file(path)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                # One snapshot for both looks: under READ COMMITTED a migration
                # committing in between shows its tables but not its version.
                conn.execution_options(isolation_level="REPEATABLE READ")
            return current_revision(conn), set(inspect(conn).get_table_names())
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot open database {engine.url.database}: {driver_message(exc)}") from exc


def read_only_engine(target: URL) -> Engine:
    """An engine that looks at an existing database without migrating, creating or converting it.

    A SQLite file is opened by :func:`~kissbot.engine.connect_sqlite_query_only`
    (kissbot's own engine would switch it to WAL on connect); other databases
    get a plain engine. It has no key: it cannot read tokens.
    """
    path = sqlite_path(target)
    if path is None:
        return create_engine(target, poolclass=NullPool)
    return sqlalchemy.create_engine("sqlite://", creator=lambda: connect_sqlite_query_only(path), poolclass=NullPool)


def is_known_revision(revision: str) -> bool:
    """True if ``revision`` is one of this version's migrations."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate ``engine``'s database up to ``revision`` in one transaction."""
    from alembic import command

    with migration_connection(engine) as conn:
        command.upgrade(alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate ``engine``'s database down to ``revision`` in one transaction."""
    from alembic import command

    with migration_connection(engine) as conn:
        command.downgrade(alembic_config(conn), revision)


def ensure_schema(engine: Engine, *, create: bool = True) -> None:
    """Bring the database to :data:`HEAD`, refusing what kissbot must not touch.

    An empty database is created; one at an older revision is upgraded; one
    with kissbot's tables but no Alembic version raises
    :class:`~kissbot.errors.UnversionedDatabase`; one at a revision this
    version does not know raises :class:`~kissbot.errors.SchemaError`.
    With ``create=False`` the schema is never written: an empty database
    raises :class:`~kissbot.errors.NoDatabase` and an older one
    :class:`~kissbot.errors.OutdatedSchema`, both pointing at ``kissbot init-db``.
    """
    revision, tables = _state(engine)
    if revision == HEAD:
        return
    if not create and revision is None and not tables & KISSBOT_TABLES:
        raise NoDatabase(f"database {engine.url.database} has no kissbot tables; create them with kissbot init-db")
    if revision is None and tables & KISSBOT_TABLES:
        raise UnversionedDatabase(
            f"database {engine.url.database} has kissbot tables but no migration version: run `kissbot adopt` first"
        )
    if revision is not None and not is_known_revision(revision):
        raise SchemaError(f"database is at migration {revision}, which this kissbot version does not know; upgrade kissbot")
    if not create:
        raise OutdatedSchema(
            f"database {engine.url.database} is at migration {revision}, this kissbot needs {HEAD}: "
            "migrate it with kissbot init-db"
        )
    upgrade(engine)
