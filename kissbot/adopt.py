"""Adopt a SQLite database that KissBot v4 created without Alembic.

KissBot v4 built ``kissbot.db`` from a hand-written ``schema.sql`` (the
specification's ``CREATE TABLE`` statements, with per-deployment variants), wrote
naive local timestamps and wrapped each Fernet token once more in URL-safe
base64. :func:`adopt` checks such a database read-only, reports how it differs
from kissbot's baseline schema (revision 0001), and then, in one transaction
after a backup: rebuilds the five tables to the baseline shape, converts
timestamps to UTC, unwraps the tokens to standard Fernet, lowercases logins,
stamps 0001 and upgrades to :data:`~kissbot.migrations.HEAD`.

Everything that would make the adoption fail (a wrong key, logins differing only
by case, rows the baseline cannot hold) is found before anything is written, so
a refused adoption leaves the file byte-identical.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy
from sqlalchemy import inspect, select, type_coerce
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.types import NULLTYPE

from kissbot.crypto import TokenCipher, read_key_ring
from kissbot.backup import backup_sqlite, default_backup_path
from kissbot.engine import DEFAULT_BUSY_TIMEOUT_MS, connect_sqlite_query_only, create_engine
from kissbot.errors import AdoptionError, ConfigurationError, DecryptionError
from kissbot.migrations import HEAD, alembic_config, current_revision, is_known_revision, migration_connection
from kissbot.models import metadata
from kissbot.types import EncryptedString, ciphertext
from kissbot.verification import (
    SQLITE_INTERNAL_TABLES,
    TableShape,
    quote_name,
    database_problems,
    reflect_shapes,
    summary,
)

BASELINE = "0001"
"""The revision an adopted database is stamped with before it is upgraded to head."""

SPEC_TABLES = ("users", "oauth_tokens", "instances", "audit_log", "config")
_FERNET_PREFIX = "gAAAAA"
_NEW = "_adopt_new_"
_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"  # what SQLAlchemy's SQLite DATETIME writes and reads


# --- time zones --------------------------------------------------------------------------------


def resolve_zone(name: str | None = None) -> tuple[tzinfo, str]:
    """The zone named ``name`` (IANA, e.g. ``Europe/Paris``), or the machine's zone; with its name.

    The machine's zone comes from ``TZ`` or the ``/etc/localtime`` link, so
    daylight saving time is applied to each timestamp as of its own date.
    """
    if name:
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(f"unknown time zone {name!r}: give an IANA name such as Europe/Paris") from None
    env = os.environ.get("TZ", "").lstrip(":")
    if env:
        try:
            return ZoneInfo(env), env
        except (ZoneInfoNotFoundError, ValueError):
            pass
    target = os.path.realpath("/etc/localtime")
    if "zoneinfo/" in target:
        key = target.split("zoneinfo/", 1)[1]
        try:
            return ZoneInfo(key), key
        except (ZoneInfoNotFoundError, ValueError):
            pass
    local = datetime.now(timezone.utc).astimezone().tzinfo
    assert local is not None
    return local, str(local)


def to_utc(value: Any, zone: tzinfo) -> str:
    """A stored v4 timestamp as kissbot stores UTC on SQLite; naive values are in ``zone``.

    A naive time that the zone's clocks showed twice (the hour DST ends) is
    read as the first of the two. Raise :class:`ValueError` if ``value`` is not
    a timestamp.
    """
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(timezone.utc).strftime(_SQLITE_DATETIME)


# --- schema shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """kissbot's baseline schema (revision 0001) on SQLite: its shapes and its DDL."""

    shapes: dict[str, TableShape]
    create_table: dict[str, str]
    create_indexes: tuple[str, ...]

    def datetime_columns(self, table: str) -> tuple[str, ...]:
        """The baseline's timestamp columns of ``table``."""
        return tuple(n for n, (type_, _, _) in self.shapes[table].columns.items() if type_ == "DATETIME")


def baseline() -> Baseline:
    """Build revision 0001 in memory with the real migration and describe it."""
    from alembic import command

    engine = sqlalchemy.create_engine("sqlite://", poolclass=StaticPool)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), BASELINE)
            shapes = reflect_shapes(conn, SPEC_TABLES)
            rows = conn.exec_driver_sql(
                "SELECT type, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL AND tbl_name != 'alembic_version'"
            ).all()
    finally:
        engine.dispose()
    return Baseline(
        shapes=shapes,
        create_table={t: sql for kind, t, sql in rows if kind == "table" and t in SPEC_TABLES},
        create_indexes=tuple(sql for kind, _, sql in rows if kind == "index"),
    )


def _cols(columns: Iterable[str]) -> str:
    return ", ".join(columns)


def schema_differences(found: dict[str, TableShape], base: Baseline) -> list[str]:
    """Every difference of ``found`` from the baseline, one line each, and what adoption does about it."""
    lines: list[str] = []
    for table in SPEC_TABLES:
        want, have = base.shapes[table], found[table]
        for name, (type_, nullable, default) in want.columns.items():
            if name not in have.columns:
                lines.append(f"{table}.{name}: missing (added, {f'default {default}' if default else 'empty'})")
                continue
            h_type, h_nullable, h_default = have.columns[name]
            if h_nullable != nullable and name not in want.primary_key:
                lines.append(
                    f"{table}.{name}: {'nullable' if h_nullable else 'NOT NULL'} "
                    f"(baseline: {'nullable' if nullable else 'NOT NULL'})"
                )
            if h_default != default:
                lines.append(f"{table}.{name}: default {h_default or 'none'} (baseline: {default or 'none'})")
        retyped: dict[tuple[str, str], list[str]] = {}
        for name, (type_, _, _) in want.columns.items():
            if name in have.columns and have.columns[name][0] != type_:
                retyped.setdefault((have.columns[name][0], type_), []).append(name)
        for (h_type, type_), names in retyped.items():
            shown = names[0] if len(names) == 1 else f"{{{_cols(names)}}}"
            lines.append(f"{table}.{shown}: type {h_type} (baseline: {type_})")
        for name in have.columns.keys() - want.columns.keys():
            lines.append(f"{table}.{name}: not in the baseline")
        if have.primary_key != want.primary_key:
            lines.append(f"{table}: primary key ({_cols(have.primary_key)}) (baseline: ({_cols(want.primary_key)}))")
        for cols in sorted(want.uniques - have.uniques):
            lines.append(f"{table}.{_cols(cols)}: not unique (baseline: unique)")
        for cols in sorted(have.uniques - want.uniques):
            lines.append(f"{table}.{_cols(cols)}: unique (baseline: not unique)")
        for cols, ref, ref_cols, ondelete in sorted(want.foreign_keys - have.foreign_keys, key=str):
            action = f" ON DELETE {ondelete}" if ondelete else ""
            lines.append(f"{table}({_cols(cols)}) -> {ref}({_cols(ref_cols)}){action}: foreign key missing (added)")
        for cols, ref, ref_cols, ondelete in sorted(have.foreign_keys - want.foreign_keys, key=str):
            action = f" ON DELETE {ondelete}" if ondelete else ""
            lines.append(f"{table}({_cols(cols)}) -> {ref}({_cols(ref_cols)}){action}: foreign key not in the baseline (dropped)")
        for name, (cols, unique) in want.indexes.items():
            if name not in have.indexes:
                lines.append(f"index {name} on {table}: missing (created)")
            elif have.indexes[name] != (cols, unique):
                h_cols, h_unique = have.indexes[name]
                lines.append(
                    f"index {name} on {table}: {'unique ' if h_unique else ''}({_cols(h_cols)}) "
                    f"(baseline: {'unique ' if unique else ''}({_cols(cols)}))"
                )
        for name in sorted(have.indexes.keys() - want.indexes.keys()):
            lines.append(f"index {name} on {table}: not in the baseline (dropped)")
        for name in have.triggers:
            lines.append(f"trigger {name} on {table}: not in the baseline (dropped)")
    return lines


# --- reading and converting the data -----------------------------------------------------------


@dataclass
class _Plan:
    """What adoption found and the rows it will write."""

    differences: list[str]
    rows: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = field(default_factory=dict)
    timestamps: int = 0
    wrapped_tokens: int = 0
    logins_lowercased: int = 0
    sequences: dict[str, int] = field(default_factory=dict)


def _blocking(conn: Connection, found: dict[str, TableShape], base: Baseline) -> list[str]:
    """The reasons the baseline cannot hold this database's rows as they are."""
    problems = []
    for kind, name, table in conn.exec_driver_sql("SELECT type, name, tbl_name FROM sqlite_master ORDER BY name"):
        # Triggers and indexes on the five tables are dropped by the rebuild; anything else would stay.
        if table not in SPEC_TABLES and name not in SQLITE_INTERNAL_TABLES and not name.startswith("sqlite_autoindex_"):
            problems.append(f"{kind} {name} is not part of kissbot's schema")
    for table in SPEC_TABLES:
        want, have = base.shapes[table].columns, found[table].columns
        extra = [c for c in have if c not in want]
        if extra:
            problems.append(f"{table} has column(s) {_cols(extra)} that kissbot's schema cannot hold")
        for name, (_, nullable, default) in want.items():
            if nullable:
                continue
            if name not in have and default is None and name not in base.shapes[table].primary_key:
                problems.append(f"{table} lacks the required column {name}")
            elif name in have:
                nulls = conn.exec_driver_sql(f"SELECT count(*) FROM {quote_name(table)} WHERE {quote_name(name)} IS NULL").scalar()
                if nulls:
                    problems.append(f"{nulls} {table} row(s) have no {name}")
    if problems:
        return problems
    clashes = []
    for login in conn.exec_driver_sql(
        "SELECT lower(twitch_login) FROM users GROUP BY lower(twitch_login) HAVING count(*) > 1 ORDER BY 1"
    ).scalars().all():
        members = conn.exec_driver_sql(
            "SELECT id, twitch_login FROM users WHERE lower(twitch_login) = ? ORDER BY id", (login,)
        ).all()
        clashes.append(" / ".join(f"{name!r} (user {uid})" for uid, name in members))
    if clashes:
        problems.append(f"logins differing only by case: {', '.join(clashes)}")
    for twitch_id, ids in conn.exec_driver_sql(
        "SELECT twitch_user_id, group_concat(id, ', ') FROM users GROUP BY twitch_user_id HAVING count(*) > 1"
    ):
        problems.append(f"users {ids} share the Twitch id {twitch_id}")
    for user_id, n in conn.exec_driver_sql(
        "SELECT user_id, count(*) FROM oauth_tokens GROUP BY user_id HAVING count(*) > 1 ORDER BY user_id"
    ):
        problems.append(f"user {user_id} has {n} token rows (the baseline holds one per user)")
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    for table, rowid, parent, _ in broken[:5]:
        problems.append(f"{table} row {rowid} refers to a missing {parent} row")
    if len(broken) > 5:
        problems.append(f"{len(broken) - 5} more rows break a foreign key")
    return problems


def _plan(conn: Connection, base: Baseline, zone: tzinfo, cipher: Callable[[], TokenCipher]) -> _Plan:
    """Read the v4 database on ``conn`` (writing nothing) and convert its rows; raise :class:`AdoptionError`."""
    tables = set(inspect(conn).get_table_names())
    missing = [t for t in SPEC_TABLES if t not in tables]
    if missing:
        raise AdoptionError(f"not a KissBot v4 database: table(s) {_cols(missing)} missing")
    found = reflect_shapes(conn, SPEC_TABLES)
    problems = _blocking(conn, found, base)
    if problems:
        raise AdoptionError(f"cannot adopt: {'; '.join(problems)}; fix these, then run adopt again (nothing was changed)")
    plan = _Plan(schema_differences(found, base))
    if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first():
        plan.sequences = dict(conn.exec_driver_sql("SELECT name, seq FROM sqlite_sequence").all())
    bad_times: list[str] = []
    undecryptable: list[int] = []
    for table in SPEC_TABLES:
        columns = [c for c in base.shapes[table].columns if c in found[table].columns]
        model = metadata.tables[table]
        # Every value as the file holds it: token columns as their ciphertext, the others
        # without their type's conversion (times are converted below, from what v4 wrote).
        tokens = {i for i, c in enumerate(columns) if isinstance(model.c[c].type, EncryptedString)}
        stored = [ciphertext(model.c[c]) if i in tokens else type_coerce(model.c[c], NULLTYPE) for i, c in enumerate(columns)]
        stamps = {columns.index(c) for c in base.datetime_columns(table) if c in columns}
        login = columns.index("twitch_login") if table == "users" else None
        owner = columns.index("user_id") if tokens else None
        rows = []
        for raw in conn.execute(select(*stored)):
            row = list(raw)
            for i in stamps:
                if row[i] is not None:
                    try:
                        row[i] = to_utc(row[i], zone)
                    except ValueError:
                        bad_times.append(f"{table}.{columns[i]} {row[i]!r}")
                        continue
                    plan.timestamps += 1
            for i in tokens:
                try:
                    if not isinstance(row[i], str):
                        raise DecryptionError("not a text token")
                    cipher().decrypt(row[i])
                except DecryptionError:
                    undecryptable.append(row[owner])
                    continue
                if not row[i].startswith(_FERNET_PREFIX):
                    row[i] = base64.urlsafe_b64decode(row[i].encode("ascii")).decode("ascii")
                    plan.wrapped_tokens += 1
            if login is not None and row[login] != row[login].lower():
                row[login] = row[login].lower()
                plan.logins_lowercased += 1
            rows.append(tuple(row))
        plan.rows[table] = (columns, rows)
    if bad_times:
        shown = ", ".join(bad_times[:3]) + (f" and {len(bad_times) - 3} more" if len(bad_times) > 3 else "")
        raise AdoptionError(f"cannot adopt: values that are not timestamps: {shown} (nothing was changed)")
    if undecryptable:
        users = ", ".join(map(str, sorted(set(undecryptable))))
        raise AdoptionError(
            f"cannot adopt: the tokens of user(s) {users} do not decrypt with this key "
            "(wrong key file?); nothing was changed"
        )
    return plan


# --- the adoption ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdoptionReport:
    """What :func:`adopt` found and did."""

    database: Path
    revision: str | None
    """The migration the database was at before (None: un-versioned, i.e. KissBot v4)."""
    differences: tuple[str, ...] = ()
    row_counts: dict[str, int] = field(default_factory=dict)
    timestamps: int = 0
    wrapped_tokens: int = 0
    logins_lowercased: int = 0
    zone: str = ""
    backup: Path | None = None
    dry_run: bool = False

    @property
    def already_adopted(self) -> bool:
        """True when the database already had a migration version and was left alone."""
        return self.revision is not None

    def lines(self) -> list[str]:
        """The report as printed by ``kissbot adopt``."""
        if self.already_adopted:
            upgrade = "" if self.revision == HEAD else f" (`kissbot init-db` upgrades it to {HEAD})"
            return [f"Database {self.database} is already adopted (migration {self.revision}): nothing to do{upgrade}."]
        lines = [f"Database: {self.database} (KissBot v4, no migration version)"]
        lines.append(f"Differences from kissbot's baseline schema ({BASELINE}):")
        lines += [f"  {d}" for d in self.differences] or ["  none"]
        lines.append("Conversions:")
        lines.append(f"  {self.timestamps} timestamps: naive local time in {self.zone} -> UTC")
        lines.append(f"  {self.wrapped_tokens} token values: base64-wrapped Fernet -> standard Fernet")
        lines.append(f"  {self.logins_lowercased} logins lowercased")
        lines.append("Rows kept: " + ", ".join(f"{t} {n}" for t, n in self.row_counts.items()))
        if self.dry_run:
            lines.append("Dry run: nothing was written.")
        else:
            lines.append(f"Backup: {self.backup}")
            lines.append(f"Adopted: stamped {BASELINE} and upgraded to {HEAD}.")
        return lines


@contextmanager
def _read_only_connection(path: Path) -> Iterator[Connection]:
    engine = sqlalchemy.create_engine("sqlite://", creator=lambda: connect_sqlite_query_only(path), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _cipher_loader(key_file: Path) -> Callable[[], TokenCipher]:
    cipher: list[TokenCipher] = []

    def load() -> TokenCipher:
        if not cipher:
            if not key_file.exists():
                raise AdoptionError(f"cannot adopt: the database holds tokens but key file {key_file} does not exist")
            cipher.append(TokenCipher(read_key_ring(key_file)))
        return cipher[0]

    return load


def _report(path: Path, plan: _Plan, zone: str, **extra: Any) -> AdoptionReport:
    return AdoptionReport(
        database=path,
        revision=None,
        differences=tuple(plan.differences),
        row_counts={t: len(plan.rows[t][1]) for t in SPEC_TABLES},
        timestamps=plan.timestamps,
        wrapped_tokens=plan.wrapped_tokens,
        logins_lowercased=plan.logins_lowercased,
        zone=zone,
        **extra,
    )


def _rebuild(conn: Connection, plan: _Plan, base: Baseline) -> None:
    """Recreate the five tables in the baseline shape holding ``plan``'s rows."""
    for name in conn.exec_driver_sql(
        f"SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN ({_cols('?' * len(SPEC_TABLES))})",
        SPEC_TABLES,
    ).scalars().all():
        conn.exec_driver_sql(f"DROP TRIGGER {quote_name(name)}")
    for table in SPEC_TABLES:
        new = _NEW + table
        ddl, n = re.subn(rf'^CREATE TABLE\s+"?{table}"?', f"CREATE TABLE {quote_name(new)}", base.create_table[table])
        assert n == 1, table
        conn.exec_driver_sql(ddl)
        columns, rows = plan.rows[table]
        if rows:
            conn.exec_driver_sql(
                f"INSERT INTO {quote_name(new)} ({_cols(map(quote_name, columns))}) VALUES ({_cols('?' * len(columns))})", rows
            )
        conn.exec_driver_sql(f"DROP TABLE {quote_name(table)}")
        conn.exec_driver_sql(f"ALTER TABLE {quote_name(new)} RENAME TO {quote_name(table)}")
    for ddl in base.create_indexes:
        conn.exec_driver_sql(ddl)
    for table, seq in plan.sequences.items():
        if table in SPEC_TABLES:
            conn.exec_driver_sql("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (seq, table))


def adopt(
    db_path: str | os.PathLike[str],
    *,
    key_file: str | os.PathLike[str],
    assume_tz: str | None = None,
    dry_run: bool = False,
) -> AdoptionReport:
    """Adopt the KissBot v4 SQLite database ``db_path`` into kissbot's migrations.

    ``key_file`` holds the Fernet key the tokens were encrypted with (needed
    only if there are tokens); ``assume_tz`` names the zone of the naive
    timestamps (default: the machine's zone). Raises
    :class:`~kissbot.errors.AdoptionError`, having written nothing, when the
    database cannot be adopted. A database that already has a migration version
    is left alone (the report says so). With ``dry_run`` nothing is written
    at all: no backup, no key file, no change to the database.
    """
    path = Path(db_path)
    if not path.is_file():
        raise AdoptionError(f"no database at {path}")
    zone, zone_name = resolve_zone(assume_tz)
    base = baseline()
    cipher = _cipher_loader(Path(key_file))
    with _read_only_connection(path) as conn:
        revision = current_revision(conn)
        if revision is not None:
            _check_adopted(conn, path, revision)
            return AdoptionReport(path, revision)
        if not set(inspect(conn).get_table_names()) & set(SPEC_TABLES):
            raise AdoptionError(f"{path} has no kissbot tables: nothing to adopt (create a store with `kissbot init-db`)")
        plan = _plan(conn, base, zone, cipher)
    if dry_run:
        return _report(path, plan, zone_name, dry_run=True)
    from alembic import command

    engine = _journal_keeping_engine(path)
    backup: Path | None = None
    try:
        with migration_connection(engine) as conn:
            # Holding the write lock now: read again what the backup holds.
            if current_revision(conn) is not None:
                return AdoptionReport(path, current_revision(conn))
            plan = _plan(conn, base, zone, cipher)
            backup = backup_sqlite(path, default_backup_path(path))
            _rebuild(conn, plan, base)
            cfg = alembic_config(conn)
            command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
            problems = database_problems(conn, HEAD)
            if problems:
                raise AdoptionError(f"cannot adopt: the adopted database would not match migration {HEAD}: "
                                    f"{summary(problems)}; nothing was changed")
    except BaseException:
        if backup is not None:
            backup.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()
    # Only now, adopted, does the file become a kissbot store in WAL mode.
    _switch_to_wal(path)
    return _report(path, plan, zone_name, backup=backup)


def _check_adopted(conn: Connection, path: Path, revision: str) -> None:
    # A database with a migration version must be exactly that revision's schema.
    if not is_known_revision(revision):
        return
    problems = database_problems(conn, revision)
    if problems:
        raise AdoptionError(
            f"{path} says it is at migration {revision} but is not a database kissbot made: {summary(problems)}; "
            "nothing was changed"
        )


def _journal_keeping_engine(path: Path) -> sqlalchemy.Engine:
    """An engine writing ``path`` in write transactions (``BEGIN IMMEDIATE``) without switching it to WAL.

    kissbot's own engine switches a file to WAL when it connects, which would
    change a database whose adoption is then refused.
    """
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", poolclass=NullPool)

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver issues no BEGIN of its own
        dbapi_connection.execute(f"PRAGMA busy_timeout = {DEFAULT_BUSY_TIMEOUT_MS}")

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _switch_to_wal(path: Path) -> None:
    engine = create_engine(path, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()
