"""Is a database exactly what kissbot's migrations make of it?

A backup to restore, a database to adopt and a live store (``kissbot doctor``)
are compared with the schema their Alembic revision defines, built by running
the real migrations up to that revision on a scratch in-memory database: the
same tables, columns (type, nullability, default), keys, indexes and checks,
and no other object (a trigger, a view, a table or an index kissbot did not
create). Then their rows must be what kissbot writes: each value of the type
of its column (no BLOB token, no REAL ``key_version``), foreign keys intact,
one ``alembic_version`` row, and config values the store can be opened with.
On PostgreSQL (``doctor``) column types are compared by the kind of value
they hold and the backend enforces the rest. Everything here only reads.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SAWarning
from sqlalchemy.pool import StaticPool

from kissbot.settings import SETTINGS
from kissbot.validation import echo

SQLITE_INTERNAL_TABLES = frozenset({"sqlite_sequence", "sqlite_stat1", "sqlite_stat2", "sqlite_stat3", "sqlite_stat4"})
"""Tables SQLite itself creates (AUTOINCREMENT counters, ``ANALYZE`` statistics)."""

MAX_SEQUENCE = 2**53
"""Highest AUTOINCREMENT counter a restored store may hold: more ids than a store uses in centuries; a counter
near 2**63 would leave no id for the next row."""

_FINGERPRINT = re.compile(r"key_fingerprint_v(\d+)")

# The SQLite storage class (typeof) of each reflected column type kissbot uses.
_STORAGE = {"INTEGER": "integer", "BOOLEAN": "integer", "TEXT": "text", "VARCHAR": "text", "DATETIME": "text"}
# Values of the right storage class that kissbot still cannot read: SQL condition on the column, and what they are.
_VALUES = {"BOOLEAN": ("{} NOT IN (0, 1)", "other than 0 and 1"), "DATETIME": ("julianday({}) IS NULL", "that are not timestamps")}


@dataclass(frozen=True)
class TableShape:
    """What matters of one table's schema, as reflected."""

    columns: dict[str, tuple[str, bool, str | None]]  # name -> (type, nullable, default)
    primary_key: tuple[str, ...]
    uniques: frozenset[tuple[str, ...]]
    foreign_keys: frozenset[tuple[tuple[str, ...], str, tuple[str, ...], str | None]]
    indexes: dict[str, tuple[tuple[str, ...], bool]]  # name -> (columns, unique)
    triggers: tuple[str, ...]
    checks: frozenset[str] = frozenset()
    kinds: dict[str, str] = field(default_factory=dict)  # name -> Python type of the column's values (any backend)
    index_keys: dict[str, tuple[bool, tuple[str, ...]]] = field(default_factory=dict)
    """SQLite: name -> (has a WHERE clause, each key as written: column or expression, order, collation)."""


def _default(text: str | None) -> str | None:
    # '0' and 0, 'info' and "info" are the same default for SQLite.
    return None if text is None else text.strip().strip("'\"")


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def reflect_shapes(conn: Connection, tables: Iterable[str]) -> dict[str, TableShape]:
    """The shape of each of ``tables`` that exists in the database of ``conn``."""
    insp = inspect(conn)
    present = set(insp.get_table_names())
    triggers: dict[str, list[str]] = {}
    for name, table in sorted(_triggers(conn)):
        triggers.setdefault(table, []).append(name)
    shapes = {}
    for table in tables:
        if table not in present:
            continue
        with warnings.catch_warnings():  # an expression index: index_keys describes it
            warnings.filterwarnings("ignore", "Skipped unsupported reflection", SAWarning)
            shapes[table] = _shape(conn, insp, table, triggers)
    return shapes


def _shape(conn: Connection, insp: Any, table: str, triggers: dict[str, list[str]]) -> TableShape:
    return TableShape(
        columns={
            c["name"]: (str(c["type"]), bool(c["nullable"]), _default(c["default"]))
            for c in insp.get_columns(table)
        },
        primary_key=tuple(insp.get_pk_constraint(table)["constrained_columns"]),
        uniques=frozenset(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
        foreign_keys=frozenset(
            (
                tuple(fk["constrained_columns"]),
                fk["referred_table"],
                tuple(fk["referred_columns"]),
                (fk["options"].get("ondelete") or "").upper() or None,
            )
            for fk in insp.get_foreign_keys(table)
        ),
        indexes={i["name"]: (tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)},
        triggers=tuple(triggers.get(table, ())),
        checks=frozenset(" ".join(c["sqltext"].split()) for c in insp.get_check_constraints(table)),
        kinds={c["name"]: _kind(c["type"]) for c in insp.get_columns(table)},
        index_keys=_index_keys(conn, table) if conn.dialect.name == "sqlite" else {},
    )


def _index_keys(conn: Connection, table: str) -> dict[str, tuple[bool, tuple[str, ...]]]:
    """The indexes of ``table`` that CREATE INDEX made, as SQLite records them (PRAGMA index_list, index_xinfo)."""
    found = {}
    for _, name, _, origin, partial in conn.exec_driver_sql(f"PRAGMA index_list({quote_name(table)})").all():
        if origin != "c":
            continue
        keys = tuple(
            (column or "an expression") + (" DESC" if desc else "") + ("" if coll == "BINARY" else f" COLLATE {coll}")
            for _, _, column, desc, coll, key in conn.exec_driver_sql(f"PRAGMA index_xinfo({quote_name(name)})").all()
            if key
        )
        found[name] = (bool(partial), keys)
    return found


def _keys(index: tuple[bool, tuple[str, ...]]) -> str:
    return f"({_pairs(index[1])})" + (" with a WHERE clause" if index[0] else "")


def _kind(type_: Any) -> str:
    try:
        return type_.python_type.__name__
    except NotImplementedError:
        return str(type_)


def _triggers(conn: Connection) -> list[tuple[str, str]]:
    """``(trigger, table)`` of every trigger a user created."""
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'")
    elif conn.dialect.name == "postgresql":
        rows = conn.exec_driver_sql(
            "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::regnamespace"
        )
    else:
        return []
    return [(name, table) for name, table in rows]


@dataclass(frozen=True)
class Schema:
    """A whole SQLite schema: every table's shape and every named object."""

    tables: dict[str, TableShape]
    objects: frozenset[tuple[str, str, str]]
    """``(type, name, table)`` of each table, index, trigger and view, SQLite's own excepted."""


def reflect_schema(conn: Connection) -> Schema:
    """The schema of the database of ``conn`` (on PostgreSQL, its current schema)."""
    if conn.dialect.name == "sqlite":
        objects = frozenset(
            (kind, name, table)
            for kind, name, table in conn.exec_driver_sql("SELECT type, name, tbl_name FROM sqlite_master")
            if not name.startswith("sqlite_autoindex_") and name not in SQLITE_INTERNAL_TABLES
        )
    else:
        insp = inspect(conn)
        found = {("table", t, t) for t in insp.get_table_names()}
        found |= {("view", v, v) for v in insp.get_view_names()}
        if conn.dialect.name == "postgresql":
            found |= {("view", v, v) for v in insp.get_materialized_view_names()}
        for _, table, _ in list(found):
            if ("table", table, table) in found:
                found |= {("index", i["name"], table) for i in insp.get_indexes(table) if not i.get("duplicates_constraint")}
        found |= {("trigger", name, table) for name, table in _triggers(conn)}
        objects = frozenset(found)
    tables = [name for kind, name, _ in objects if kind == "table"]
    return Schema(reflect_shapes(conn, tables), objects)


def expected_schema(revision: str) -> Schema:
    """The schema kissbot's migrations create at ``revision``, built in a scratch in-memory database."""
    from alembic import command

    from kissbot.migrations import alembic_config

    engine = sqlalchemy.create_engine("sqlite://", poolclass=StaticPool)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
            return reflect_schema(conn)
    finally:
        engine.dispose()


def _pairs(cols: Sequence[str]) -> str:
    return ", ".join(cols)


def schema_differences(found: Schema, expected: Schema, revision: str, *, exact_types: bool = True) -> list[str]:
    """How ``found`` differs from ``expected`` (the schema of ``revision``), one phrase each.

    ``expected`` is built on SQLite; for another backend pass ``exact_types=False``:
    column types are then compared by the Python type of their values, and
    defaults (spelled differently by each backend) are not compared.
    """
    at = f"migration {revision}"
    lines = []
    for kind, name, table in sorted(found.objects - expected.objects):
        if kind == "table" and name in expected.tables:
            continue
        on = f" on {table}" if kind in ("index", "trigger") else ""
        lines.append(f"{kind} {name}{on} is not part of {at}")
    for kind, name, table in sorted(expected.objects - found.objects):
        if kind == "table" or (table in expected.tables and table not in found.tables):
            if kind == "table":
                lines.append(f"table {name} of {at} is missing")
            continue
        lines.append(f"{kind} {name} on {table} of {at} is missing")
    for table, want in expected.tables.items():
        have = found.tables.get(table)
        if have is None:
            continue
        for column in want.columns.keys() - have.columns.keys():
            lines.append(f"column {table}.{column} of {at} is missing")
        for column in have.columns.keys() - want.columns.keys():
            lines.append(f"column {table}.{column} is not part of {at}")
        for column, (type_, nullable, default) in want.columns.items():
            if column not in have.columns:
                continue
            h_type, h_nullable, h_default = have.columns[column]
            if exact_types and h_type != type_:
                lines.append(f"column {table}.{column} has type {h_type}, {at} defines {type_}")
            elif not exact_types and have.kinds[column] != want.kinds[column]:
                lines.append(f"column {table}.{column} has type {h_type}, {at} defines {type_}")
            if h_nullable != nullable and column not in want.primary_key:
                lines.append(
                    f"column {table}.{column} is {'nullable' if h_nullable else 'NOT NULL'}, "
                    f"{at} defines {'nullable' if nullable else 'NOT NULL'}"
                )
            if exact_types and h_default != default:
                lines.append(f"column {table}.{column} has default {h_default or 'none'}, {at} defines {default or 'none'}")
        if have.primary_key != want.primary_key:
            lines.append(f"table {table} has primary key ({_pairs(have.primary_key)}), {at} defines ({_pairs(want.primary_key)})")
        for cols in sorted(have.uniques ^ want.uniques):
            state = "unique" if cols in have.uniques else "not unique"
            lines.append(f"{table}({_pairs(cols)}) is {state}, unlike {at}")
        for fk in sorted(have.foreign_keys ^ want.foreign_keys, key=str):
            cols, ref, ref_cols, ondelete = fk
            action = f" ON DELETE {ondelete}" if ondelete else ""
            state = "not part of" if fk in have.foreign_keys else "missing from"
            lines.append(f"foreign key {table}({_pairs(cols)}) -> {ref}({_pairs(ref_cols)}){action} is {state} {at}")
        for name, shape in want.indexes.items():
            if name in have.indexes and have.indexes[name] != shape:
                h_cols, h_unique = have.indexes[name]
                lines.append(
                    f"index {name} on {table} is {'unique ' if h_unique else ''}({_pairs(h_cols)}), "
                    f"{at} defines {'unique ' if shape[1] else ''}({_pairs(shape[0])})"
                )
            elif exact_types and name in have.index_keys and have.index_keys[name] != want.index_keys.get(name):
                lines.append(f"index {name} on {table} is {_keys(have.index_keys[name])}, {at} defines {_keys(want.index_keys[name])}")
        for check in sorted(have.checks ^ want.checks):
            state = "not part of" if check in have.checks else "missing from"
            lines.append(f"check ({check}) on {table} is {state} {at}")
    return lines


def row_problems(conn: Connection, expected: Schema, *, config: bool = True) -> list[str]:
    """Rows of a database with the ``expected`` schema that kissbot could not read or open the store with.

    On SQLite, whose columns hold any type, each value's storage class is
    checked; other backends enforce their column types and foreign keys.
    """
    problems = []
    sqlite = conn.dialect.name == "sqlite"
    for table, shape in sorted(expected.tables.items()) if sqlite else ():
        for column, (type_, nullable, _) in shape.columns.items():
            storage = _STORAGE.get(type_.split("(")[0].upper())
            if storage is None:
                continue
            allowed = f"('{storage}'{', ' + repr('null') if nullable else ''})"
            rows = conn.exec_driver_sql(
                f"SELECT typeof({quote_name(column)}), count(*) FROM {quote_name(table)} "
                f"WHERE typeof({quote_name(column)}) NOT IN {allowed} GROUP BY 1 ORDER BY 1"
            ).all()
            for kind, n in rows:
                problems.append(f"{table}.{column} holds {kind} in {n} row(s), kissbot stores {storage}")
            if type_ in _VALUES:
                condition, what = _VALUES[type_]
                col = quote_name(column)
                n = conn.exec_driver_sql(
                    f"SELECT count(*) FROM {quote_name(table)} WHERE typeof({col}) = '{storage}' AND {condition.format(col)}"
                ).scalar()
                if n:
                    problems.append(f"{table}.{column} holds {n} value(s) {what}")
    if "alembic_version" in expected.tables:
        n = conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar()
        if n != 1:
            problems.append(f"alembic_version holds {n} rows, not 1")
    if sqlite and conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first():
        counters = conn.exec_driver_sql(
            "SELECT name, seq FROM sqlite_sequence WHERE typeof(seq) != 'integer' OR seq NOT BETWEEN 0 AND ?",
            (MAX_SEQUENCE,),
        ).all()
        for name, seq in counters:
            problems.append(f"sqlite_sequence holds {echo(seq)} for {echo(name)}, not an id counter from 0 to {MAX_SEQUENCE}")
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all() if sqlite else []
    if broken:
        table, rowid, parent, _ = broken[0]
        problems.append(f"{len(broken)} row(s) break a foreign key, first {table} row {rowid} (no such {parent} row)")
    if config and "config" in expected.tables and not problems:
        problems += config_problems(conn.exec_driver_sql("SELECT key, value FROM config ORDER BY key").all())
    return problems


def config_problems(rows: Iterable[tuple[str, str]]) -> list[str]:
    """Config values the store could not be opened or run with."""
    problems = []
    for key, value in rows:
        match = _FINGERPRINT.fullmatch(key)
        if match and int(match[1]) < 1:
            problems.append(f"config key {key} names key version {match[1]}, not a version >= 1")
        elif key in SETTINGS and SETTINGS[key].parse(value) is None:
            problems.append(f"config {key} is {value[:20]!r}, not {SETTINGS[key].expected}")
    return problems


def database_problems(conn: Connection, revision: str, *, config: bool = True) -> list[str]:
    """Why the database of ``conn``, which says it is at ``revision``, is not a sound kissbot store.

    The schema differences come first; rows are only looked at when the
    schema is exact. Empty: the database is what kissbot makes.
    ``config=False`` leaves the config values out (``kissbot doctor`` reports
    each one itself, see :func:`kissbot.settings.problems`).
    """
    expected = expected_schema(revision)
    exact = conn.dialect.name == "sqlite"
    differences = schema_differences(reflect_schema(conn), expected, revision, exact_types=exact)
    if differences:
        return differences
    return row_problems(conn, expected, config=config)


def summary(problems: Sequence[str]) -> str:
    """The first problem, and how many more there are."""
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more)" if more else "")
