"""Copy a whole store from one database to another (SQLite → PostgreSQL, and back).

:func:`copy_store` moves every row of the five tables as stored: token columns
keep their ciphertext (the copy never decrypts to write), timestamps stay aware
UTC, ids stay the same. The target is migrated to head first and then filled
in one transaction, so it ends up with the whole store or stays empty. Before
committing, row counts are checked against the source and every copied token
is decrypted with the key, so a copy made with the wrong key is never kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import ColumnElement, Insert, Table, Text, bindparam, delete, func, insert, select, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from kissbot.crypto import TokenCipher
from kissbot.engine import connect_sqlite_query_only, create_engine, writer
from kissbot.urls import shown, sqlite_path, to_url
from kissbot.errors import CopyError, DatabaseError, DecryptionError, TargetNotEmpty, driver_message
from kissbot.migrations import HEAD, KISSBOT_TABLES, _state, ensure_schema
from kissbot.models import metadata
from kissbot.settings import FINGERPRINT_PREFIX, SETTINGS
from kissbot.types import EncryptedString, ciphertext

COPY_ORDER = ("users", "oauth_tokens", "instances", "audit_log", "config")
"""The tables, parents before children."""

BATCH_SIZE = 1000
"""Rows read and written per round trip; bounds the memory a copy needs."""

_SERIAL_TABLES = ("users", "oauth_tokens", "instances", "audit_log")


_TABLES = {name: metadata.tables[name] for name in COPY_ORDER}


def _stored(table: Table) -> list[ColumnElement[Any]]:
    # Every column as stored: token columns as their ciphertext (the copy never decrypts to write).
    return [ciphertext(c) if isinstance(c.type, EncryptedString) else c for c in table.columns]


def _insert_stored(table: Table) -> Insert:
    return insert(table).values(
        {c.key: bindparam(c.key, type_=Text) for c in table.columns if isinstance(c.type, EncryptedString)}
    )


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_store` copied: rows per table (in copy order) and tokens decrypted."""

    source: str
    target: str
    counts: dict[str, int] = field(default_factory=dict)
    tokens_verified: int = 0


def copy_store(
    source: str | os.PathLike[str] | URL,
    target: str | os.PathLike[str] | URL,
    cipher: TokenCipher,
    *,
    batch_size: int = BATCH_SIZE,
) -> CopyReport:
    """Copy every row of the store at ``source`` into the empty store at ``target``.

    ``source`` must be at the newest migration (:data:`~kissbot.migrations.HEAD`);
    it is only read, in one snapshot. ``target`` is created or migrated to head,
    then filled in one transaction: rows in batches of ``batch_size``, id
    sequences set past the copied ids, row counts compared with the source and
    every token decrypted with ``cipher``. Any failure rolls the whole copy back.

    Raises :class:`~kissbot.errors.TargetNotEmpty` (writing nothing) if the
    target holds any kissbot row other than the settings kissbot reads and key fingerprints, and
    :class:`~kissbot.errors.CopyError` if the source is not a kissbot store at
    head or the copy does not check out.
    """
    src_url, dst_url = to_url(source), to_url(target)
    _check_source(src_url)
    _check_target_empty(dst_url)
    src_engine = create_engine(src_url)
    dst_engine = create_engine(dst_url, cipher=cipher)
    try:
        ensure_schema(dst_engine)
        with _snapshot(src_engine) as src, writer(dst_engine).begin() as dst:
            _check_target_empty_in(dst, shown(dst_url))
            counts = {name: _copy_table(src, dst, _TABLES[name], batch_size) for name in COPY_ORDER}
            _reset_sequences(src, dst)
            _verify_counts(src, dst, counts)
            verified = _verify_tokens(dst, cipher, batch_size)
    finally:
        src_engine.dispose()
        dst_engine.dispose()
    return CopyReport(shown(src_url), shown(dst_url), counts, verified)


def _check_source(url: URL) -> None:
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise CopyError(f"source database {path} does not exist")
    engine = create_engine(url)
    try:
        revision, tables = _state(engine)
    finally:
        engine.dispose()
    if revision != HEAD:
        where = f"--db {path}" if path is not None else f"--url {shown(url)}"
        state = f"is at migration {revision}" if revision else ("has no migration version" if tables else "is empty")
        raise CopyError(f"source {shown(url)} {state}, not {HEAD}: run `kissbot init-db {where}` first")


@contextmanager
def _read_only_sqlite(path: Path) -> Iterator[Connection]:
    # A SQLite file that may be refused is looked at without kissbot's connect
    # event (which would switch it to WAL), leaving its directory as it was.
    engine = sqlalchemy.create_engine("sqlite://", creator=lambda: connect_sqlite_query_only(path))
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _check_target_empty(url: URL) -> None:
    path = sqlite_path(url)
    if path is not None:
        if not path.exists() or path.stat().st_size == 0:
            return
        with _read_only_sqlite(path) as conn:
            _check_target_empty_in(conn, shown(url))
        return
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _check_target_empty_in(conn, shown(url))
    except DBAPIError as exc:
        raise DatabaseError(f"cannot open target database {url.database}: {driver_message(exc)}") from exc
    finally:
        engine.dispose()


def _check_target_empty_in(conn: Connection, name: str) -> None:
    present = KISSBOT_TABLES.intersection(sqlalchemy.inspect(conn).get_table_names())
    found = {}
    for table in COPY_ORDER:
        if table not in present:
            continue
        stmt = select(func.count()).select_from(_TABLES[table])
        if table == "config":
            # kissbot's settings, and the key fingerprints a store records when first opened with a key, are not content.
            key = _TABLES["config"].c.key
            stmt = stmt.where(key.not_in(list(SETTINGS)), ~key.startswith(FINGERPRINT_PREFIX))
        count = conn.execute(stmt).scalar_one()
        if count:
            found[table] = count
    if found:
        rows = ", ".join(f"{table}: {count}" for table, count in found.items())
        raise TargetNotEmpty(f"target {name} is not empty ({rows}): kissbot copy only fills an empty store")


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    # One consistent view of the source for every table and count.
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _copy_table(src: Connection, dst: Connection, table: Table, batch_size: int) -> int:
    if table.name == "config":
        dst.execute(delete(table))
    copied = 0
    order = list(table.primary_key.columns)
    result = src.execute(select(*_stored(table)).order_by(*order).execution_options(yield_per=batch_size))
    stmt = _insert_stored(table)
    for rows in result.mappings().partitions():
        try:
            dst.execute(stmt, [dict(row) for row in rows])
        except DBAPIError as exc:
            raise CopyError(f"copying {table.name} failed: {driver_message(exc)}; nothing was copied") from exc
        copied += len(rows)
    return copied


def _high_water(conn: Connection, table: str) -> int:
    """The largest id ``table`` has handed out (its sequence), at least its largest id."""
    top = conn.execute(select(func.max(_TABLES[table].c.id))).scalar() or 0
    if conn.dialect.name == "sqlite":
        seq = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).scalar()
    else:
        sequence = conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one()
        seq = conn.exec_driver_sql(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence}").scalar()
    return max(top, seq or 0)


def _reset_sequences(src: Connection, dst: Connection) -> None:
    # The next id the target hands out is past every id the source handed out,
    # so AUTOINCREMENT's "never reuse an id" survives the copy.
    for table in _SERIAL_TABLES:
        high = _high_water(src, table)
        if dst.dialect.name == "postgresql":
            dst.execute(
                text("SELECT setval(pg_get_serial_sequence(:t, 'id'), :n, :called)"),
                {"t": table, "n": max(high, 1), "called": high > 0},
            )
        elif high:
            updated = dst.exec_driver_sql("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (high, table))
            if updated.rowcount == 0:
                dst.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, high))


def _verify_counts(src: Connection, dst: Connection, copied: dict[str, int]) -> None:
    for name, count in copied.items():
        stmt = select(func.count()).select_from(_TABLES[name])
        in_source, in_target = src.execute(stmt).scalar_one(), dst.execute(stmt).scalar_one()
        if not in_source == in_target == count:
            raise CopyError(
                f"{name}: source has {in_source} rows, {count} were copied, target has {in_target}; nothing was copied"
            )


def _verify_tokens(dst: Connection, cipher: TokenCipher, batch_size: int) -> int:
    tokens = _TABLES["oauth_tokens"]
    stmt = select(
        tokens.c.user_id,
        tokens.c.token_type,
        ciphertext(tokens.c.access_token_encrypted),
        ciphertext(tokens.c.refresh_token_encrypted),
    ).order_by(tokens.c.id).execution_options(yield_per=batch_size)
    verified = 0
    for rows in dst.execute(stmt).partitions():
        for row in rows:
            try:
                cipher.decrypt(row.access_token_encrypted)
                cipher.decrypt(row.refresh_token_encrypted)
            except DecryptionError:
                raise DecryptionError(
                    f"tokens of user {row.user_id} ({row.token_type}) do not decrypt with this key "
                    "(wrong key or corrupted data): nothing was copied",
                    user_id=row.user_id,
                ) from None
            verified += 1
    return verified
