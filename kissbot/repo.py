"""Repositories: the store's API over one session or connection.

Each repository wraps a :class:`~sqlalchemy.orm.Session` (or a Core
:class:`~sqlalchemy.engine.Connection`); it never commits, never opens a
connection, and returns plain dicts. Statements on the hot path are built once
with bind parameters, and token columns are only selected (and so decrypted)
where the caller asked for them.
"""

from __future__ import annotations

import json
from operator import itemgetter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import repeat
from typing import TYPE_CHECKING, Any, Union

from sqlalchemy import Column, ColumnElement, Text, bindparam, delete, false, func, insert, literal_column, null, select, update
from sqlalchemy.engine import Connection, Dialect, Result
from sqlalchemy.exc import IntegrityError

from kissbot.crypto import KeyFileCipher, TokenCipher
from kissbot.errors import (
    DecryptionError,
    DuplicateUser,
    InstanceDisabled,
    InstanceNotFound,
    KissbotError,
    StaleTokens,
    UserNotFound,
)
from kissbot.models import audit_log, config, instances, oauth_tokens, users
from kissbot.types import cipher_of, utcnow
from kissbot import validation as check

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Executor = Union["Session", Connection]
"""What a repository runs its statements on."""

def _first_dict(result: Result[Any]) -> dict[str, Any] | None:
    """The first row of ``result`` as a plain dict, or None."""
    # dict(zip(keys, row)) costs a tenth of Row._asdict(), which builds a RowMapping first.
    keys = result.keys()
    row = result.first()
    return dict(zip(keys, row)) if row is not None else None


def _all_dicts(result: Result[Any]) -> list[dict[str, Any]]:
    """Every row of ``result`` as a plain dict."""
    # map() keeps the per-row loop in C: a quarter faster than the comprehension on a 100-row scan.
    return list(map(dict, map(zip, repeat(tuple(result.keys())), result.all())))


_IN_CHUNK = 400
"""Values bound to one ``IN (…)`` of the batch methods: two lists stay under SQLite's oldest limit of 999 variables."""


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


class _Prepared:
    """A write statement compiled once per engine and run with ``exec_driver_sql``.

    ``Connection.execute`` of even a prebuilt statement looks it up in the
    engine's compiled cache and builds its parameters through the compiler on
    every call, about as much again as the statement itself on a token write.
    Here SQLAlchemy compiles the statement once per dialect; each call only
    applies the same type processors (encryption, UTC timestamps) in the
    compiled order. A :class:`Session` gets the statement itself, so its
    autoflush still runs. One parameter set per call: batches use
    :func:`_execute_many`.
    """

    __slots__ = ("stmt",)

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt

    def __call__(self, db: Executor, params: dict[str, Any]) -> Any:
        if not isinstance(db, Connection):
            return db.execute(self.stmt, params)
        prepared = db.dialect.__dict__.setdefault(_PREPARED_ATTR, {})
        entry = prepared.get(self)
        if entry is None:
            entry = prepared[self] = self._compile(db.dialect)
        compiled, processors, order = entry
        values = compiled.construct_params(params)
        for name, process in processors:
            values[name] = process(values[name])
        return db.exec_driver_sql(compiled.string, values if order is None else tuple(values[k] for k in order))

    def _compile(self, dialect: Dialect) -> tuple[Any, tuple[tuple[str, Any], ...], tuple[str, ...] | None]:
        compiled = self.stmt.compile(dialect=dialect)
        processors = tuple(
            (name, process)
            for name, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        )
        order = tuple(compiled.positiontup) if compiled.positional else None
        return compiled, processors, order


_PREPARED_ATTR = "_kissbot_prepared"


def _inline(db: Executor, column: Column[Any], value: Any) -> ColumnElement[Any]:
    """``value`` written into a batch statement as ``column``'s SQL literal, as the dialect stores it.

    A value every row of a batch shares (the time, the token type, …) is then
    converted once, instead of once per row as a bound parameter is: with a
    timestamp that is ~3 µs a row and a column. Text is bound instead: a
    caller's string could hold ``%``, which PostgreSQL's driver would see doubled.
    The statement is new on each call: run it with :data:`_UNCACHED`.
    """
    if isinstance(value, str):
        raise TypeError("bind text values; _inline is for times, numbers and flags")
    dialect = _dialect(db)
    # The dialect's own type, as for a bound value: SQLite's DATETIME always writes the microseconds.
    return literal_column(column.type.dialect_impl(dialect).literal_processor(dialect)(value), column.type)


_UNCACHED = {"compiled_cache": None}
"""Execution options for a statement holding :func:`_inline` values: it would only fill the engine's compiled cache."""


def _execute_many(db: Executor, stmt: Any, rows: list[dict[str, Any]]) -> None:
    """``db.execute(stmt, rows)`` for a batch statement whose bound values all come from ``rows`` as they are.

    SQLAlchemy's executemany builds every row's parameters through the
    compiler (~3 µs a row); the batch statements write shared values as
    literals (:func:`_inline`) and bind only values that need no type
    processing, so their rows can go to the driver as they are. A bind the
    rows lack or one with a processor, or a Session, takes ``execute``.
    """
    if isinstance(db, Connection) and rows:
        dialect = db.dialect
        compiled = stmt.compile(dialect=dialect, for_executemany=True)
        if rows[0].keys() >= compiled.binds.keys() and all(
            b.type.dialect_impl(dialect).bind_processor(dialect) is None for b in compiled.binds.values()
        ):
            if not compiled.positional:
                db.exec_driver_sql(compiled.string, rows)
            elif len(compiled.positiontup) > 1:
                db.exec_driver_sql(compiled.string, list(map(itemgetter(*compiled.positiontup), rows)))
            else:
                db.exec_driver_sql(compiled.string, [(row[compiled.positiontup[0]],) for row in rows])
            return
    db.execute(stmt, rows, execution_options=_UNCACHED)


# --- users -------------------------------------------------------------------------------------

_USER_COLUMNS = (
    users.c.id,
    users.c.twitch_user_id,
    users.c.twitch_login,
    users.c.display_name,
    users.c.is_bot,
    users.c.created_at,
    users.c.updated_at,
)
_USER_BY_ID = select(*_USER_COLUMNS).where(users.c.id == bindparam("p_id"))
_USER_BY_TWITCH_ID = select(*_USER_COLUMNS).where(users.c.twitch_user_id == bindparam("p_twitch_id"))
_USER_BY_LOGIN = select(*_USER_COLUMNS).where(users.c.twitch_login == bindparam("p_login"))
_USER_ID_BY_LOGIN = select(users.c.id).where(users.c.twitch_login == bindparam("p_login"))
_USER_ID_BY_TWITCH_ID = select(users.c.id).where(users.c.twitch_user_id == bindparam("p_twitch_id"))
_INSERT_USER = insert(users).values(
    twitch_user_id=bindparam("p_twitch_id"),
    twitch_login=bindparam("p_login"),
    display_name=bindparam("p_display"),
    is_bot=bindparam("p_is_bot"),
    created_at=bindparam("p_now"),
    updated_at=bindparam("p_now"),
)
_USER_FIELDS = frozenset({"twitch_user_id", "twitch_login", "display_name", "is_bot"})
_USERS_BY_TWITCH_IDS_OR_LOGINS = select(*_USER_COLUMNS).where(
    users.c.twitch_user_id.in_(bindparam("p_twitch_ids", expanding=True))
    | users.c.twitch_login.in_(bindparam("p_logins", expanding=True))
)


class UserRepository:
    """Twitch accounts (bots and channels). Logins are matched case-insensitively."""

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def get_user(self, twitch_user_id: str | int) -> dict[str, Any] | None:
        """The user with this Twitch user id, or None."""
        return _first_dict(self.db.execute(_USER_BY_TWITCH_ID, {"p_twitch_id": str(twitch_user_id)}))

    def get_user_by_id(self, user_id: int) -> dict[str, Any] | None:
        """The user with this kissbot id (``users.id``), or None."""
        check.check_id(user_id)
        return _first_dict(self.db.execute(_USER_BY_ID, {"p_id": user_id}))

    def get_user_by_login(self, login: str) -> dict[str, Any] | None:
        """The user with this login (any case), or None."""
        check.check_text(login, "login")
        return _first_dict(self.db.execute(_USER_BY_LOGIN, {"p_login": login.lower()}))

    def user_id_for_login(self, login: str) -> int:
        """The kissbot id of ``login``; raise :class:`UserNotFound`."""
        check.check_text(login, "login")
        user_id = self.db.execute(_USER_ID_BY_LOGIN, {"p_login": login.lower()}).scalar()
        if user_id is None:
            raise UserNotFound(f"no user with login {login!r}")
        return user_id

    def create_user(
        self, twitch_user_id: str | int, twitch_login: str, display_name: str | None = None, is_bot: bool = False
    ) -> int:
        """Create a user and return its id; raise :class:`DuplicateUser`."""
        check.check_user_fields(twitch_user_id=twitch_user_id, twitch_login=twitch_login, display_name=display_name)
        twitch_user_id, login = str(twitch_user_id), twitch_login.lower()
        params = {
            "p_twitch_id": twitch_user_id,
            "p_login": login,
            "p_display": display_name,
            "p_is_bot": bool(is_bot),
            "p_now": utcnow(),
        }
        for stmt, value, what in (
            (_USER_ID_BY_TWITCH_ID, twitch_user_id, "Twitch user id"),
            (_USER_ID_BY_LOGIN, login, "login"),
        ):
            if self.db.execute(stmt, params).first() is not None:
                raise DuplicateUser(f"a user with {what} {value!r} already exists")
        try:
            result = self.db.execute(_INSERT_USER, params)
        except IntegrityError as exc:
            raise DuplicateUser(f"user {login!r} (Twitch id {twitch_user_id}) already exists") from exc
        user_id = result.inserted_primary_key[0]
        AuditRepository(self.db).log_event("user_created", user_id=user_id, details={"login": login, "is_bot": bool(is_bot)})
        return user_id

    def update_user(self, user_id: int, **fields: Any) -> None:
        """Change ``twitch_user_id``, ``twitch_login``, ``display_name`` or ``is_bot``."""
        unknown = set(fields) - _USER_FIELDS
        if unknown:
            raise KissbotError(f"cannot update user field(s) {', '.join(sorted(unknown))}")
        check.check_id(user_id)
        check.check_user_fields(**fields)
        if "twitch_login" in fields:
            fields["twitch_login"] = fields["twitch_login"].lower()
        if "twitch_user_id" in fields:
            fields["twitch_user_id"] = str(fields["twitch_user_id"])
        try:
            result = self.db.execute(update(users).where(users.c.id == user_id).values(**fields, updated_at=utcnow()))
        except IntegrityError as exc:
            raise DuplicateUser(f"another user already has {', '.join(f'{k}={v!r}' for k, v in fields.items())}") from exc
        if result.rowcount == 0:
            raise UserNotFound(f"no user with id {user_id}")

    # Batch methods, for imports of many users: a few statements in all
    # instead of several per user, and no audit event of their own (the
    # importer records exactly one per user).

    def find_users(self, twitch_user_ids: Iterable[str | int] = (), logins: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Every user whose Twitch user id or login (any case) is among these, each once."""
        ids, lower = sorted({str(v) for v in twitch_user_ids}), sorted({login.lower() for login in logins})
        if not (ids or lower):
            return []
        if self.count() <= len(ids) + len(lower):
            # Fewer users than names (an import into a new or small store): one read of
            # them all costs less than looking the names up 400 at a time.
            wanted_ids, wanted_logins = set(ids), set(lower)
            return [
                u for u in _all_dicts(self.db.execute(select(*_USER_COLUMNS)))
                if u["twitch_user_id"] in wanted_ids or u["twitch_login"] in wanted_logins
            ]
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, max(len(ids), len(lower)), _IN_CHUNK):
            params = {"p_twitch_ids": ids[start : start + _IN_CHUNK], "p_logins": lower[start : start + _IN_CHUNK]}
            for user in _all_dicts(self.db.execute(_USERS_BY_TWITCH_IDS_OR_LOGINS, params)):
                found[user["id"]] = user
        return list(found.values())

    def create_users(self, new_users: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Create many users in one statement and return their ids by Twitch user id.

        Each item has ``twitch_user_id``, ``twitch_login`` and optionally
        ``display_name`` and ``is_bot``, as :meth:`create_user` takes them.
        Unlike :meth:`create_user`, no ``user_created`` event is written: the
        caller records its own. Raises :class:`DuplicateUser` if any id or
        login is taken (nothing is then created).
        """
        if not new_users:
            return {}
        now = _inline(self.db, users.c.created_at, utcnow())
        stmt = insert(users).values(
            twitch_user_id=bindparam("p_twitch_id"),
            twitch_login=bindparam("p_login"),
            display_name=bindparam("p_display"),
            is_bot=bindparam("p_is_bot"),
            created_at=now,
            updated_at=now,
        )
        params = [
            {
                "p_twitch_id": str(u["twitch_user_id"]),
                "p_login": u["twitch_login"].lower(),
                "p_display": u.get("display_name"),
                "p_is_bot": bool(u.get("is_bot", False)),
            }
            for u in new_users
        ]
        returning = _dialect(self.db).insert_executemany_returning
        try:
            with self.db.begin_nested():
                # RETURNING with many rows: SQLAlchemy sends them as multi-row INSERTs.
                result = self.db.execute(
                    stmt.returning(users.c.twitch_user_id, users.c.id) if returning else stmt,
                    params,
                    execution_options=_UNCACHED,
                )
                if returning:
                    return {twitch_user_id: user_id for twitch_user_id, user_id in result}
        except IntegrityError as exc:
            raise DuplicateUser(f"one of {len(params)} new users has a Twitch user id or login already taken") from exc
        return {u["twitch_user_id"]: u["id"] for u in self.find_users(twitch_user_ids=[p["p_twitch_id"] for p in params])}

    def set_display_names(self, names: Mapping[int, str | None]) -> None:
        """Set the ``display_name`` of many users at once, by kissbot id (``users.id``)."""
        if names:
            stmt = (
                update(users)
                .where(users.c.id == bindparam("p_id"))
                .values(display_name=bindparam("p_display"), updated_at=_inline(self.db, users.c.updated_at, utcnow()))
            )
            _execute_many(self.db, stmt, [{"p_id": i, "p_display": n} for i, n in names.items()])

    def list_users(self) -> list[dict[str, Any]]:
        """Every user, ordered by login."""
        return _all_dicts(self.db.execute(select(*_USER_COLUMNS).order_by(users.c.twitch_login)))

    def count(self) -> int:
        """Number of users."""
        return self.db.execute(select(func.count()).select_from(users)).scalar_one()


# --- tokens ------------------------------------------------------------------------------------

TOKEN_TYPES = ("bot", "broadcaster")
_ROW = (oauth_tokens.c.user_id == bindparam("p_user_id")) & (oauth_tokens.c.token_type == bindparam("p_type"))

_TOKENS_BY_USER = select(
    oauth_tokens.c.user_id,
    oauth_tokens.c.token_type,
    oauth_tokens.c.access_token_encrypted.label("access_token"),
    oauth_tokens.c.refresh_token_encrypted.label("refresh_token"),
    oauth_tokens.c.scopes,
    oauth_tokens.c.expires_at,
    oauth_tokens.c.needs_reauth,
    oauth_tokens.c.refresh_failures,
    oauth_tokens.c.status,
    oauth_tokens.c.version,
    oauth_tokens.c.last_refresh,
    oauth_tokens.c.last_validated,
    oauth_tokens.c.created_at,
    oauth_tokens.c.updated_at,
).where(_ROW)
_STORED_VALUES = {
    "access_token_encrypted": bindparam("p_access"),
    "refresh_token_encrypted": bindparam("p_refresh"),
    "scopes": bindparam("p_scopes"),
    "expires_at": bindparam("p_expires_at"),
    # Constants are written into the SQL rather than bound: fewer parameters to
    # process on every token write.
    "needs_reauth": false(),
    "status": literal_column("'valid'"),
    "refresh_failures": literal_column("0"),
    "key_version": bindparam("p_key_version"),
    "updated_at": bindparam("p_now"),
}
_KEEP_SCOPES = func.coalesce(bindparam("p_scopes"), oauth_tokens.c.scopes)
"""An update's scopes: ``scopes=None`` keeps the stored ones (an explicit ``[]`` clears them)."""
_UPDATE_TOKENS = (
    update(oauth_tokens)
    .where(_ROW)
    .values(
        **{**_STORED_VALUES, "scopes": _KEEP_SCOPES},
        version=oauth_tokens.c.version + literal_column("1"),
        last_refresh=bindparam("p_now"),
    )
)
_UPDATE_TOKENS_IF_VERSION = _UPDATE_TOKENS.where(oauth_tokens.c.version == bindparam("p_version"))
_STORE_UPDATE = _Prepared(_UPDATE_TOKENS)
_STORE_UPDATE_IF_VERSION = _Prepared(_UPDATE_TOKENS_IF_VERSION)
_INSERT_TOKENS = insert(oauth_tokens).values(
    **_STORED_VALUES,
    user_id=bindparam("p_user_id"),
    token_type=bindparam("p_type"),
    version=literal_column("1"),
    created_at=bindparam("p_now"),
)
_VERSION = select(oauth_tokens.c.version).where(_ROW)
_KEY_VERSION = select(oauth_tokens.c.key_version).where(_ROW)
_USERS_WITH_TOKENS_OF_TYPE = select(oauth_tokens.c.user_id).where(oauth_tokens.c.token_type == bindparam("p_type"))
_USERS_WITH_TOKENS = _USERS_WITH_TOKENS_OF_TYPE.where(oauth_tokens.c.user_id.in_(bindparam("p_user_ids", expanding=True)))
_TOKENS_DUE = (
    select(
        oauth_tokens.c.user_id,
        oauth_tokens.c.token_type,
        users.c.twitch_login,
        oauth_tokens.c.expires_at,
        # NULLs become False / 0 in SQL: the rows then need no Python pass.
        func.coalesce(oauth_tokens.c.needs_reauth, false()).label("needs_reauth"),
        func.coalesce(oauth_tokens.c.refresh_failures, 0).label("refresh_failures"),
    )
    .join(users, users.c.id == oauth_tokens.c.user_id)
    .where(oauth_tokens.c.expires_at <= bindparam("p_cutoff"))
    .order_by(oauth_tokens.c.expires_at)
)
_TOKEN_LIST = (
    select(
        oauth_tokens.c.user_id,
        users.c.twitch_login,
        oauth_tokens.c.token_type,
        oauth_tokens.c.status,
        oauth_tokens.c.scopes,
        oauth_tokens.c.expires_at,
        oauth_tokens.c.needs_reauth,
        oauth_tokens.c.refresh_failures,
        oauth_tokens.c.updated_at,
    )
    .join(users, users.c.id == oauth_tokens.c.user_id)
    .order_by(users.c.twitch_login, oauth_tokens.c.token_type)
)
_MARK_EXPIRED = (
    update(oauth_tokens)
    .where(_ROW)
    .values(needs_reauth=True, status=bindparam("p_status"), updated_at=bindparam("p_now"))
)
_INCREMENT_FAILURES = (
    update(oauth_tokens)
    .where(_ROW)
    .values(refresh_failures=oauth_tokens.c.refresh_failures + 1, updated_at=bindparam("p_now"))
)
_FAILURES = select(oauth_tokens.c.refresh_failures).where(_ROW)
_LEASE_FREE = oauth_tokens.c.refresh_lease_owner.is_(None) | (
    oauth_tokens.c.refresh_lease_expires_at < bindparam("p_now")
)
_TAKE_LEASE = {"refresh_lease_owner": bindparam("p_owner"), "refresh_lease_expires_at": bindparam("p_until")}
_CLAIM = (
    update(oauth_tokens)
    .where(_ROW, _LEASE_FREE | (oauth_tokens.c.refresh_lease_owner == bindparam("p_owner")))
    .values(**_TAKE_LEASE)
)
# FOR UPDATE SKIP LOCKED on PostgreSQL: rows another worker is claiming are
# passed over, not waited for. SQLite renders no locking clause; its
# BEGIN IMMEDIATE write transaction already lets one claimer in at a time.
_DUE_AND_FREE = (
    select(oauth_tokens.c.id)
    .where(oauth_tokens.c.expires_at <= bindparam("p_cutoff"), oauth_tokens.c.needs_reauth.is_not(True), _LEASE_FREE)
    .order_by(oauth_tokens.c.expires_at, oauth_tokens.c.id)
    .limit(bindparam("p_limit"))
    .with_for_update(skip_locked=True)
)
_LEASE_IDS = update(oauth_tokens).where(oauth_tokens.c.id.in_(bindparam("p_ids", expanding=True))).values(**_TAKE_LEASE)
_CLAIMED = (
    select(
        oauth_tokens.c.user_id,
        oauth_tokens.c.token_type,
        users.c.twitch_login,
        oauth_tokens.c.expires_at,
        func.coalesce(oauth_tokens.c.refresh_failures, 0).label("refresh_failures"),
        oauth_tokens.c.version,
    )
    .join(users, users.c.id == oauth_tokens.c.user_id)
    .where(oauth_tokens.c.id.in_(bindparam("p_ids", expanding=True)))
    .order_by(oauth_tokens.c.expires_at, oauth_tokens.c.id)
)
_RELEASE = (
    update(oauth_tokens)
    .where(_ROW, oauth_tokens.c.refresh_lease_owner == bindparam("p_owner"))
    .values(refresh_lease_owner=None, refresh_lease_expires_at=None)
)
_TOKENS_TO_VALIDATE = (
    select(
        oauth_tokens.c.user_id,
        oauth_tokens.c.token_type,
        users.c.twitch_login,
        oauth_tokens.c.expires_at,
        oauth_tokens.c.last_validated,
    )
    .join(users, users.c.id == oauth_tokens.c.user_id)
    .where(
        oauth_tokens.c.needs_reauth.is_not(True),
        oauth_tokens.c.last_validated.is_(None) | (oauth_tokens.c.last_validated <= bindparam("p_cutoff")),
    )
    .order_by(oauth_tokens.c.user_id, oauth_tokens.c.token_type)
)
_RECORD_VALIDATION = update(oauth_tokens).where(_ROW).values(last_validated=bindparam("p_now"))


def _decode_scopes(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return raw.split()
    return [str(s) for s in value] if isinstance(value, list) else [str(value)]


def _dialect(db: Executor) -> Dialect:
    return db.dialect if isinstance(db, Connection) else db.get_bind().dialect


def _check_type(token_type: str) -> str:
    if token_type not in TOKEN_TYPES:
        raise KissbotError(f"token_type must be one of {', '.join(TOKEN_TYPES)}, not {token_type!r}")
    return token_type


def _check_tokens(user_id: int, access_token: str, refresh_token: str) -> None:
    for name, value in (("access_token", access_token), ("refresh_token", refresh_token)):
        if not isinstance(value, str) or not value:
            raise KissbotError(f"{name} for user {user_id} must be a non-empty string")


def _token_params(
    user_id: int,
    token_type: str,
    access_token: str,
    refresh_token: str,
    scopes: list[str] | None,
    expires_at: datetime,
    now: datetime,
    key_version: int,
) -> dict[str, Any]:
    """The bound values of a token row write (the tokens are encrypted when bound)."""
    return {
        "p_user_id": user_id,
        "p_type": token_type,
        "p_access": access_token,
        "p_refresh": refresh_token,
        "p_scopes": json.dumps(list(scopes)) if scopes is not None else None,
        "p_expires_at": expires_at,
        "p_now": now,
        "p_key_version": key_version,
    }


class TokenRepository:
    """A user's OAuth tokens, encrypted at rest and decrypted only when read.

    A user holds at most one row per token type (``bot`` or ``broadcaster``);
    every method takes ``token_type="bot"`` so the specification's calls work.
    """

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def store_tokens(
        self,
        user_id: int,
        access_token: str,
        refresh_token: str,
        expires_in: int | float,
        scopes: list[str] | None = None,
        *,
        token_type: str = "bot",
        expected_version: int | None = None,
    ) -> bool:
        """Insert or replace the tokens of ``user_id``; return True if they are new.

        Resets ``needs_reauth``, ``status`` and ``refresh_failures``, bumps the
        row's ``version`` and writes one audit event (``tokens_created`` or
        ``tokens_refreshed``) without any secret. ``scopes=None`` keeps the
        stored scopes (an explicit ``[]`` clears them). With ``expected_version``, the
        write only happens if the stored row is still at that version (or, for
        ``0``, does not exist yet); otherwise :class:`StaleTokens` is raised and
        the newer tokens are kept.
        """
        _check_type(token_type)
        check.check_id(user_id)
        _check_tokens(user_id, access_token, refresh_token)
        check.check_expires_in(expires_in)
        scopes = check.check_scopes(scopes)
        now = utcnow()
        # The key version is read before the values are encrypted: a key file reloaded
        # in between can only make the row's key newer than its label, which rotation fixes.
        key_version = cipher_of(_dialect(self.db)).current_version
        params = _token_params(
            user_id, token_type, access_token, refresh_token, scopes, now + timedelta(seconds=expires_in), now, key_version
        )
        params["p_version"] = expected_version
        write = _STORE_UPDATE if expected_version is None else _STORE_UPDATE_IF_VERSION
        created = write(self.db, params).rowcount == 0
        if created:
            if expected_version is not None:
                current = self.db.execute(_VERSION, params).scalar()
                if current is not None or expected_version != 0:
                    raise StaleTokens(
                        f"tokens of user {user_id} ({token_type}) are at version {current or 0}, "
                        f"not {expected_version}: another process stored newer tokens"
                    )
            try:
                with self.db.begin_nested():
                    self.db.execute(_INSERT_TOKENS, params)
            except IntegrityError as exc:
                # Either the user does not exist, or (PostgreSQL: SQLite writers
                # are serialised) another transaction inserted the row first.
                if UserRepository(self.db).get_user_by_id(user_id) is None:
                    raise UserNotFound(f"no user with id {user_id}") from exc
                if expected_version is not None:
                    raise StaleTokens(
                        f"tokens of user {user_id} ({token_type}) were just created by another process, "
                        f"not at version {expected_version}"
                    ) from exc
                _STORE_UPDATE(self.db, params)
                created = False
        AuditRepository(self.db).log_event(
            "tokens_created" if created else "tokens_refreshed",
            user_id=user_id,
            details={
                "token_type": token_type,
                "expires_in": expires_in,
                "scopes": list(scopes) if scopes is not None else None,
            },
        )
        return created

    def store_many_tokens(
        self,
        tokens: Iterable[tuple[int, str, str, list[str] | None]],
        expires_in: int | float,
        *,
        token_type: str = "bot",
    ) -> int:
        """Insert or replace the tokens of many users at once; return how many rows are new.

        ``tokens`` holds ``(user_id, access_token, refresh_token, scopes)``,
        each user at most once. Every row is written as :meth:`store_tokens`
        writes it (flags reset, ``version`` bumped), in one UPDATE and one
        INSERT statement for all, each token encrypted once; but no audit
        event is written: the caller records its own. For a single writer
        (an import in its write transaction): a row another transaction
        inserts meanwhile makes the INSERT fail with ``IntegrityError``.
        """
        _check_type(token_type)
        check.check_expires_in(expires_in)
        # A key-file cipher looks at its file (a stat) before each encryption; the
        # batch looks once, and its rows record the key that encrypted them.
        store_cipher = cipher_of(_dialect(self.db))
        if isinstance(store_cipher, KeyFileCipher):
            store_cipher.refresh()
        cipher = TokenCipher(store_cipher.ring)
        encrypt = cipher.encrypt
        params = []
        for user_id, access_token, refresh_token, scopes in tokens:
            _check_tokens(user_id, access_token, refresh_token)
            params.append({
                "p_user_id": user_id,
                "p_type": token_type,
                "p_access": encrypt(access_token),
                "p_refresh": encrypt(refresh_token),
                "p_scopes": json.dumps(list(scopes)) if scopes is not None else None,
            })
        now = utcnow()
        t = oauth_tokens.c
        stored = {
            # Already encrypted: bound as text, not through the column's EncryptedString.
            "access_token_encrypted": bindparam("p_access", type_=Text),
            "refresh_token_encrypted": bindparam("p_refresh", type_=Text),
            "scopes": bindparam("p_scopes"),
            "expires_at": _inline(self.db, t.expires_at, now + timedelta(seconds=expires_in)),
            "needs_reauth": _inline(self.db, t.needs_reauth, False),
            "status": literal_column("'valid'"),
            "refresh_failures": _inline(self.db, t.refresh_failures, 0),
            "key_version": _inline(self.db, t.key_version, cipher.current_version),
            "updated_at": _inline(self.db, t.updated_at, now),
        }
        existing: set[int] = set()
        if self.count() <= len(params):
            # Fewer token rows than users in the batch: read which users have them at once.
            existing.update(self.db.execute(_USERS_WITH_TOKENS_OF_TYPE, {"p_type": token_type}).scalars())
        else:
            for chunk in _chunks([p["p_user_id"] for p in params]):
                existing.update(self.db.execute(_USERS_WITH_TOKENS, {"p_type": token_type, "p_user_ids": chunk}).scalars())
        updates = [p for p in params if p["p_user_id"] in existing]
        inserts = [p for p in params if p["p_user_id"] not in existing]
        if updates:
            _execute_many(
                self.db,
                update(oauth_tokens)
                .where(t.user_id == bindparam("p_user_id"), t.token_type == bindparam("p_type"))
                .values(
                    **{**stored, "scopes": _KEEP_SCOPES},
                    version=t.version + literal_column("1"),
                    last_refresh=stored["updated_at"],
                ),
                updates,
            )
        if inserts:
            _execute_many(
                self.db,
                insert(oauth_tokens).values(
                    **stored,
                    user_id=bindparam("p_user_id"),
                    token_type=bindparam("p_type"),
                    version=_inline(self.db, t.version, 1),
                    created_at=stored["updated_at"],
                ),
                inserts,
            )
        return len(inserts)

    def get_tokens(self, user_id: int, *, token_type: str = "bot") -> dict[str, Any] | None:
        """The decrypted tokens of ``user_id``, or None if it has none.

        ``expired`` is True once ``expires_at`` has passed (``status`` stays
        ``valid`` until a refresh fails: an expired token is refreshable).
        Raises :class:`DecryptionError` naming the user and the row's key
        version if they do not decrypt.
        """
        check.check_id(user_id)
        params = {"p_user_id": user_id, "p_type": token_type}
        try:
            tokens = _first_dict(self.db.execute(_TOKENS_BY_USER, params))
        except DecryptionError as exc:
            key_version = self.db.execute(_KEY_VERSION, params).scalar()
            raise DecryptionError(
                f"Failed to decrypt tokens for user {user_id} (key version {key_version}): "
                "wrong key or corrupted data",
                user_id=user_id,
                key_version=key_version,
            ) from exc
        if tokens is None:
            return None
        tokens["scopes"] = _decode_scopes(tokens["scopes"])
        tokens["needs_reauth"] = bool(tokens["needs_reauth"])
        tokens["refresh_failures"] = tokens["refresh_failures"] or 0
        tokens["expired"] = tokens["expires_at"] <= utcnow()
        return tokens

    def get_tokens_needing_refresh(self, buffer_minutes: float = 10) -> list[dict[str, Any]]:
        """Tokens expiring within ``buffer_minutes`` (or expired), soonest first; nothing decrypted."""
        check.check_seconds(buffer_minutes, "buffer_minutes", check.MAX_SECONDS / 60)
        cutoff = utcnow() + timedelta(minutes=buffer_minutes)
        return _all_dicts(self.db.execute(_TOKENS_DUE, {"p_cutoff": cutoff}))

    def mark_tokens_expired(self, user_id: int, *, token_type: str = "bot", revoked: bool = False) -> None:
        """Flag the tokens of ``user_id`` as needing reauthorisation (``expired``, or ``revoked``)."""
        params = {"p_user_id": user_id, "p_type": token_type, "p_now": utcnow(), "p_status": "revoked" if revoked else "expired"}
        if self.db.execute(_MARK_EXPIRED, params).rowcount == 0:
            raise UserNotFound(f"user {user_id} has no {token_type} tokens")
        AuditRepository(self.db).log_event(
            f"tokens_{params['p_status']}", user_id=user_id, details={"token_type": token_type}, severity="warning"
        )

    def increment_refresh_failures(self, user_id: int, *, token_type: str = "bot") -> int:
        """Count one more failed refresh for ``user_id`` and return the new count."""
        params = {"p_user_id": user_id, "p_type": token_type, "p_now": utcnow()}
        if self.db.execute(_INCREMENT_FAILURES, params).rowcount == 0:
            raise UserNotFound(f"user {user_id} has no {token_type} tokens")
        return self.db.execute(_FAILURES, params).scalar_one()

    def claim_refresh(self, user_id: int, owner: str, ttl: float, *, token_type: str = "bot") -> bool:
        """Take the refresh lease of a token row for ``ttl`` seconds; True if ``owner`` now holds it.

        Exactly one owner holds a live lease; an expired lease can be taken
        over, and the holder may extend its own.
        """
        check.check_seconds(ttl, "ttl")
        check.check_text(owner, "owner")
        now = utcnow()
        params = {
            "p_user_id": user_id, "p_type": token_type, "p_owner": owner, "p_now": now,
            "p_until": now + timedelta(seconds=ttl),
        }
        return self.db.execute(_CLAIM, params).rowcount == 1

    def claim_due(
        self, owner: str, ttl: float, buffer_minutes: float = 10, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Take the refresh lease of up to ``limit`` due tokens for ``ttl`` seconds and return them.

        A token is due when it expires within ``buffer_minutes`` (or has
        expired), does not need reauthorisation, and its lease is free or
        expired: a live lease, even ``owner``'s own, is not handed out again.
        Rows come soonest-expiring first with ``user_id``, ``token_type``,
        ``twitch_login``, ``expires_at``, ``refresh_failures`` and ``version``;
        nothing is decrypted. Two claimers never get the same row, and on
        PostgreSQL a claimer skips the rows another is claiming instead of
        waiting for them.
        """
        check.check_seconds(ttl, "ttl")
        check.check_text(owner, "owner")
        check.check_seconds(buffer_minutes, "buffer_minutes", check.MAX_SECONDS / 60)
        check.check_count(limit, "limit", minimum=1)
        now = utcnow()
        params = {
            "p_owner": owner, "p_now": now, "p_until": now + timedelta(seconds=ttl),
            "p_cutoff": now + timedelta(minutes=buffer_minutes), "p_limit": limit,
        }
        ids = self.db.execute(_DUE_AND_FREE, params).scalars().all()
        if not ids:
            return []
        self.db.execute(_LEASE_IDS, {**params, "p_ids": ids})
        return [r._asdict() for r in self.db.execute(_CLAIMED, {"p_ids": ids})]

    def release_refresh(self, user_id: int, owner: str, *, token_type: str = "bot") -> bool:
        """Give back ``owner``'s refresh lease; False if it did not hold it (any more)."""
        params = {"p_user_id": user_id, "p_type": token_type, "p_owner": owner}
        return self.db.execute(_RELEASE, params).rowcount == 1

    def list_tokens(self, decrypt: bool = False) -> list[dict[str, Any]]:
        """Every token row (each user, each token type) with its login; nothing decrypted unless ``decrypt``.

        With ``decrypt``, each row also holds ``access_token`` and
        ``refresh_token``; a row whose tokens do not decrypt holds None for
        both and ``decrypt_error`` True instead of failing the whole list.
        ``expired`` is True for a token past its ``expires_at``.
        """
        now = utcnow()
        rows = [
            {
                **r._asdict(),
                "scopes": _decode_scopes(r.scopes),
                "needs_reauth": bool(r.needs_reauth),
                "refresh_failures": r.refresh_failures or 0,
                "expired": r.expires_at <= now,
            }
            for r in self.db.execute(_TOKEN_LIST)
        ]
        if decrypt:
            for row in rows:
                try:
                    tokens = self.get_tokens(row["user_id"], token_type=row["token_type"]) or {}
                except DecryptionError:
                    row.update(access_token=None, refresh_token=None, decrypt_error=True)
                else:
                    row.update(access_token=tokens.get("access_token"), refresh_token=tokens.get("refresh_token"))
                    row["decrypt_error"] = False
        return rows

    def get_tokens_needing_validation(self, max_age_seconds: float) -> list[dict[str, Any]]:
        """Usable tokens not validated within ``max_age_seconds`` (or never); nothing decrypted."""
        check.check_seconds(max_age_seconds, "max_age_seconds")
        cutoff = utcnow() - timedelta(seconds=max_age_seconds)
        return [r._asdict() for r in self.db.execute(_TOKENS_TO_VALIDATE, {"p_cutoff": cutoff})]

    def record_validation(self, user_id: int, *, token_type: str = "bot") -> None:
        """Store that Twitch accepted the access token of ``user_id`` just now (``last_validated``)."""
        params = {"p_user_id": user_id, "p_type": token_type, "p_now": utcnow()}
        if self.db.execute(_RECORD_VALIDATION, params).rowcount == 0:
            raise UserNotFound(f"user {user_id} has no {token_type} tokens")

    def written_at(self, user_ids: Sequence[int], *, token_type: str = "bot") -> dict[int, datetime]:
        """When the stored tokens of these users were written (their last refresh, else their creation), by user id."""
        t = oauth_tokens.c
        found: dict[int, datetime] = {}
        for chunk in _chunks(list(user_ids)):
            stmt = select(t.user_id, func.coalesce(t.last_refresh, t.created_at, t.updated_at).label("written")).where(
                t.token_type == token_type, t.user_id.in_(chunk)
            )
            found.update((row.user_id, row.written) for row in self.db.execute(stmt))
        return found

    def set_last_validated(self, times: Mapping[int, datetime], *, token_type: str = "bot") -> None:
        """Store when Twitch last accepted each user's access token (``last_validated``), by user id."""
        stmt = update(oauth_tokens).where(_ROW).values(last_validated=bindparam("p_now"))
        for user_id, when in times.items():
            self.db.execute(stmt, {"p_user_id": user_id, "p_type": token_type, "p_now": when})

    def count(self) -> int:
        """Number of token rows."""
        return self.db.execute(select(func.count()).select_from(oauth_tokens)).scalar_one()

    def count_users_with_tokens(self) -> int:
        """Number of users holding at least one token row."""
        return self.db.execute(select(func.count(oauth_tokens.c.user_id.distinct()))).scalar_one()

    def count_needing_reauth(self) -> int:
        """Number of token rows flagged ``needs_reauth``."""
        stmt = select(func.count()).select_from(oauth_tokens).where(oauth_tokens.c.needs_reauth.is_(True))
        return self.db.execute(stmt).scalar_one()


# --- instances ---------------------------------------------------------------------------------

_INSTANCE_COLUMNS = tuple(instances.c)
_LATEST_INSTANCE = (
    select(instances.c.id, instances.c.status, instances.c.crash_count)
    .where(instances.c.channel_id == bindparam("p_channel"), instances.c.bot_user_id == bindparam("p_bot"))
    .order_by(instances.c.id.desc())
    .limit(1)
)
_HEARTBEAT = (
    update(instances)
    .where(instances.c.id == bindparam("p_id"), instances.c.status != "disabled")
    .values(last_heartbeat=bindparam("p_now"), status=bindparam("p_status"), updated_at=bindparam("p_now"))
)
_BEAT = _Prepared(_HEARTBEAT)
STALE_HEARTBEATS = 3
"""A running instance whose last heartbeat is older than this many ``health_check_interval`` is stale."""


def _fresh(cutoff: datetime) -> Any:
    return (instances.c.status == "running") & (instances.c.last_heartbeat >= cutoff)


def _stale(cutoff: datetime) -> Any:
    return (instances.c.status == "running") & (
        instances.c.last_heartbeat.is_(None) | (instances.c.last_heartbeat < cutoff)
    )


class InstanceRepository:
    """Bot processes: registration, heartbeats, stops and crashes."""

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def register_instance(self, channel_login: str, bot_login: str, pid: int | None) -> int:
        """Mark the (channel, bot) instance running under ``pid`` and return its id.

        Reuses the pair's row so crashes keep counting; raises
        :class:`InstanceDisabled` if it reached ``max_crash_count``.
        """
        check.check_optional_id(pid, "pid")
        user_repo = UserRepository(self.db)
        channel_id = user_repo.user_id_for_login(channel_login)
        bot_id = user_repo.user_id_for_login(bot_login)
        now = utcnow()
        row = self.db.execute(_LATEST_INSTANCE, {"p_channel": channel_id, "p_bot": bot_id}).first()
        if row is not None and row.status == "disabled":
            raise InstanceDisabled(
                f"instance {row.id} ({bot_login} on {channel_login}) is disabled after {row.crash_count} crashes; "
                f"reset it with `kissbot instances reset {row.id}`"
            )
        values = {"status": "running", "pid": pid, "start_time": now, "stop_time": None, "last_heartbeat": now, "updated_at": now}
        if row is None:
            result = self.db.execute(
                insert(instances).values(channel_id=channel_id, bot_user_id=bot_id, created_at=now, **values)
            )
            instance_id = result.inserted_primary_key[0]
        else:
            instance_id = row.id
            self.db.execute(update(instances).where(instances.c.id == instance_id).values(**values))
        AuditRepository(self.db).log_event(
            "instance_started", user_id=bot_id, channel_id=channel_id, details={"instance_id": instance_id, "pid": pid}
        )
        return instance_id

    def update_instance_heartbeat(self, instance_id: int, status: str = "running") -> None:
        """Record a heartbeat (and status) for ``instance_id``.

        Raises :class:`InstanceDisabled` for a disabled instance: a late
        heartbeat does not bring back an instance that crashed too often.
        """
        result = _BEAT(self.db, {"p_id": instance_id, "p_now": utcnow(), "p_status": status})
        if result.rowcount == 0:
            if self.get_instance(instance_id) is None:
                raise InstanceNotFound(f"no instance with id {instance_id}")
            raise InstanceDisabled(
                f"instance {instance_id} is disabled; reset it with `kissbot instances reset {instance_id}`"
            )

    def stop_instance(self, instance_id: int, crash: bool = False) -> str:
        """Stop ``instance_id`` and return its new status.

        A crash counts toward ``max_crash_count``; at that count the instance
        becomes ``disabled``.
        """
        stopped = self._stop(instance_id, crash=crash)
        if stopped is None:
            raise InstanceNotFound(f"no instance with id {instance_id}")
        return stopped["status"]

    def reap_stale_instances(self) -> list[dict[str, Any]]:
        """Count the silent running instances as crashed and return them.

        An instance is silent when its last heartbeat is older than
        :data:`STALE_HEARTBEATS` times the config ``health_check_interval``
        (seconds). Each one becomes ``crashed`` (``disabled`` once it reaches
        ``max_crash_count``), with an ``instance_crashed``/``instance_disabled``
        audit event. Returned dicts hold ``id``, ``channel_login``,
        ``bot_login``, ``pid``, ``last_heartbeat``, ``status`` and ``crash_count``.
        """
        cutoff = self._stale_cutoff()
        channel, bot = users.alias("channel"), users.alias("bot")
        stale = self.db.execute(
            select(
                instances.c.id,
                instances.c.pid,
                instances.c.last_heartbeat,
                channel.c.twitch_login.label("channel_login"),
                bot.c.twitch_login.label("bot_login"),
            )
            .join(channel, channel.c.id == instances.c.channel_id)
            .join(bot, bot.c.id == instances.c.bot_user_id)
            .where(_stale(cutoff))
            .order_by(instances.c.id)
        ).all()
        reaped = []
        for row in stale:
            stopped = self._stop(row.id, crash=True, stale_before=cutoff)
            if stopped is not None:
                reaped.append({**row._asdict(), **stopped})
        return reaped

    def _stale_cutoff(self) -> datetime:
        interval = float(ConfigRepository(self.db).get_config("health_check_interval", default=30))
        return utcnow() - timedelta(seconds=STALE_HEARTBEATS * interval)

    def _stop(self, instance_id: int, *, crash: bool, stale_before: datetime | None = None) -> dict[str, Any] | None:
        # With ``stale_before``, only a running instance still silent since
        # then is stopped (a heartbeat may have come in meanwhile): None if not.
        where = instances.c.id == instance_id
        if stale_before is not None:
            where &= _stale(stale_before)
        row = self.db.execute(
            select(instances.c.crash_count, instances.c.channel_id, instances.c.bot_user_id, instances.c.last_heartbeat)
            .where(where)
            .with_for_update()
        ).first()
        if row is None:
            return None
        crash_count = (row.crash_count or 0) + (1 if crash else 0)
        status = "stopped"
        if crash:
            limit = ConfigRepository(self.db).get_config("max_crash_count", default=3)
            status = "disabled" if crash_count >= int(limit) else "crashed"
        now = utcnow()
        self.db.execute(
            update(instances)
            .where(instances.c.id == instance_id)
            .values(status=status, stop_time=now, crash_count=crash_count, pid=None, updated_at=now)
        )
        details: dict[str, Any] = {"instance_id": instance_id, "crash_count": crash_count}
        if stale_before is not None:
            details["reason"] = "no heartbeat"
            details["last_heartbeat"] = row.last_heartbeat.isoformat() if row.last_heartbeat else None
        AuditRepository(self.db).log_event(
            f"instance_{status}",
            user_id=row.bot_user_id,
            channel_id=row.channel_id,
            details=details,
            severity="info" if status == "stopped" else ("error" if status == "disabled" else "warning"),
        )
        return {"status": status, "crash_count": crash_count}

    def reset_instance(self, instance_id: int) -> None:
        """Clear the crash count of ``instance_id`` so it can be registered again."""
        result = self.db.execute(
            update(instances)
            .where(instances.c.id == instance_id)
            .values(status="stopped", crash_count=0, updated_at=utcnow())
        )
        if result.rowcount == 0:
            raise InstanceNotFound(f"no instance with id {instance_id}")
        AuditRepository(self.db).log_event("instance_reset", details={"instance_id": instance_id})

    def get_instance(self, instance_id: int) -> dict[str, Any] | None:
        """One instance, or None."""
        row = self.db.execute(select(*_INSTANCE_COLUMNS).where(instances.c.id == instance_id)).first()
        return row._asdict() if row else None

    def get_active_instances(self) -> list[dict[str, Any]]:
        """Running instances whose heartbeat is fresh, with the channel and bot logins.

        An instance silent for more than :data:`STALE_HEARTBEATS` health-check
        intervals is left out even before :meth:`reap_stale_instances` marks it.
        """
        channel, bot = users.alias("channel"), users.alias("bot")
        stmt = (
            select(*_INSTANCE_COLUMNS, channel.c.twitch_login.label("channel_login"), bot.c.twitch_login.label("bot_login"))
            .join(channel, channel.c.id == instances.c.channel_id)
            .join(bot, bot.c.id == instances.c.bot_user_id)
            .where(_fresh(self._stale_cutoff()))
            .order_by(instances.c.id)
        )
        return [r._asdict() for r in self.db.execute(stmt)]

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance, whatever its status, with the channel and bot logins."""
        channel, bot = users.alias("channel"), users.alias("bot")
        stmt = (
            select(*_INSTANCE_COLUMNS, channel.c.twitch_login.label("channel_login"), bot.c.twitch_login.label("bot_login"))
            .join(channel, channel.c.id == instances.c.channel_id)
            .join(bot, bot.c.id == instances.c.bot_user_id)
            .order_by(instances.c.id)
        )
        return [r._asdict() for r in self.db.execute(stmt)]

    def count_active(self) -> int:
        """Number of running instances with a fresh heartbeat (as :meth:`get_active_instances`)."""
        stmt = select(func.count()).select_from(instances).where(_fresh(self._stale_cutoff()))
        return self.db.execute(stmt).scalar_one()


# --- audit log ---------------------------------------------------------------------------------

_INSERT_AUDIT = (
    insert(audit_log)
    .values(
        event_type=bindparam("p_event_type"),
        user_id=bindparam("p_user_id"),
        channel_id=bindparam("p_channel_id"),
        details=bindparam("p_details"),
        severity=bindparam("p_severity"),
        timestamp=bindparam("p_now"),
    )
    .inline()  # no implicit RETURNING of the new id on PostgreSQL: nothing reads it
)
_LOG_EVENT = _Prepared(_INSERT_AUDIT)
SEVERITIES = ("info", "warning", "error")


def _event_params(
    event_type: str,
    user_id: int | None,
    channel_id: int | None,
    details_json: str | None,
    severity: str,
    now: datetime,
) -> dict[str, Any]:
    """The bound values of one audit row; refuses an unknown severity."""
    if severity not in SEVERITIES:
        raise KissbotError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    return {
        "p_event_type": event_type,
        "p_user_id": user_id,
        "p_channel_id": channel_id,
        "p_details": details_json,
        "p_severity": severity,
        "p_now": now,
    }


def _stored_secrets(db: Executor, user_id: int | None) -> list[str]:
    """The tokens stored for ``user_id`` (none if they do not decrypt), for the audit-details guard."""
    if user_id is None:
        return []
    t = oauth_tokens.c
    try:
        rows = db.execute(select(t.access_token_encrypted, t.refresh_token_encrypted).where(t.user_id == user_id)).all()
    except DecryptionError:
        return []
    return [secret for row in rows for secret in row if secret]


class AuditRepository:
    """The audit trail: events without secrets, newest first."""

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def log_event(
        self,
        event_type: str,
        user_id: int | None = None,
        channel_id: int | None = None,
        details: dict[str, Any] | None = None,
        severity: str = "info",
    ) -> None:
        """Append one audit event. ``details`` must not hold tokens or keys."""
        check.check_text(event_type, "event_type")
        check.check_optional_id(user_id, "user_id")
        check.check_optional_id(channel_id, "channel_id")
        details_json = check.audit_details_json(details, lambda: _stored_secrets(self.db, user_id))
        try:
            _LOG_EVENT(self.db, _event_params(event_type, user_id, channel_id, details_json, severity, utcnow()))
        except IntegrityError as exc:
            raise UserNotFound(f"no user with id {user_id if channel_id is None else f'{user_id} or {channel_id}'}") from exc

    def log_events(
        self, event_type: str, events: Iterable[tuple[int | None, dict[str, Any] | None]], severity: str = "info"
    ) -> None:
        """Append one ``event_type`` event per ``(user_id, details)`` in one statement; as :meth:`log_event`."""
        if severity not in SEVERITIES:
            raise KissbotError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
        params = [
            {"p_event_type": event_type, "p_user_id": user_id, "p_details": check.audit_details_json(details), "p_severity": severity}
            for user_id, details in events
        ]
        if params:
            a = audit_log.c
            stmt = insert(audit_log).values(
                event_type=bindparam("p_event_type"),
                user_id=bindparam("p_user_id"),
                channel_id=null(),
                details=bindparam("p_details"),
                severity=bindparam("p_severity"),
                timestamp=_inline(self.db, a.timestamp, utcnow()),
            )
            _execute_many(self.db, stmt, params)

    def get_audit_log(
        self, limit: int = 100, event_type: str | None = None, user_id: int | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events, optionally of one type or one user, ``details`` decoded."""
        check.check_count(limit, "limit", minimum=1)
        stmt = select(*audit_log.c).order_by(audit_log.c.timestamp.desc(), audit_log.c.id.desc()).limit(limit)
        if event_type is not None:
            stmt = stmt.where(audit_log.c.event_type == event_type)
        if user_id is not None:
            stmt = stmt.where(audit_log.c.user_id == user_id)
        entries = []
        for row in self.db.execute(stmt):
            entry = row._asdict()
            if entry["details"] is not None:
                try:
                    entry["details"] = json.loads(entry["details"])
                except ValueError:
                    pass
            entries.append(entry)
        return entries

    def cleanup_old_logs(self, days: int | None = None, batch_size: int | None = None) -> int:
        """Delete events older than ``days`` (default: config ``log_retention_days``).

        With ``batch_size``, delete at most that many (oldest first) so a
        caller can commit between batches. Returns the number deleted.
        """
        if days is None:
            days = int(ConfigRepository(self.db).get_config("log_retention_days", default=30))
        check.check_count(days, "days", maximum=check.MAX_DAYS)
        if batch_size is not None:
            check.check_count(batch_size, "batch_size", minimum=1)
        cutoff = utcnow() - timedelta(days=days)
        condition = audit_log.c.timestamp < cutoff
        if batch_size is not None:
            # Ordered by the indexed column so the batch is a range of idx_audit_timestamp,
            # not a scan of the whole table under the write lock.
            oldest = (
                select(audit_log.c.id).where(condition).order_by(audit_log.c.timestamp, audit_log.c.id).limit(batch_size)
            )
            condition = audit_log.c.id.in_(oldest.scalar_subquery())
        return self.db.execute(delete(audit_log).where(condition)).rowcount

    def count(self) -> int:
        """Number of audit events."""
        return self.db.execute(select(func.count()).select_from(audit_log)).scalar_one()


# --- config ------------------------------------------------------------------------------------

_CONFIG_VALUE = select(config.c.value).where(config.c.key == bindparam("p_key"))


def _decode_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class ConfigRepository:
    """System settings. Values are stored as text and read back with their JSON type."""

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def get_config(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (``"60"`` reads as 60), or ``default``."""
        raw = self.db.execute(_CONFIG_VALUE, {"p_key": key}).scalar()
        return default if raw is None else _decode_value(raw)

    def set_config(self, key: str, value: Any, description: str | None = None) -> None:
        """Set ``key`` to ``value``; strings are stored as given, anything else as JSON."""
        text = value if isinstance(value, str) else json.dumps(value)
        values: dict[str, Any] = {"value": text, "updated_at": utcnow()}
        if description is not None:
            values["description"] = description
        if self.db.execute(update(config).where(config.c.key == key).values(**values)).rowcount == 0:
            self.db.execute(insert(config).values(key=key, **values))

    def list_config(self) -> list[dict[str, Any]]:
        """Every setting, by key, values decoded."""
        rows = self.db.execute(select(*config.c).order_by(config.c.key))
        return [{**r._asdict(), "value": _decode_value(r.value)} for r in rows]
