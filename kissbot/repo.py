"""Repositories: the store's API over one session or connection.

Each repository wraps a :class:`~sqlalchemy.orm.Session` or a Core
:class:`~sqlalchemy.engine.Connection` and runs the same statements on
either with ``execute()``; it never commits, never opens a connection, and
returns plain dicts. Token columns are :class:`~kissbot.types.EncryptedString`:
they are encrypted when bound and decrypted when read, and only selected
where the caller asked for the tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Union

from sqlalchemy import ColumnElement, Result, Select, bindparam, delete, false, func, insert, select, tuple_, update
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import IntegrityError

from kissbot import settings
from kissbot.errors import (
    DecryptionError,
    DuplicateUser,
    InstanceDisabled,
    InstanceNotFound,
    StaleTokens,
    UserNotFound,
    ValidationError,
)
from kissbot import validation as check
from kissbot.models import audit_log, config, instances, oauth_tokens, users
from kissbot.types import Secret, cipher_of, ciphertext, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Executor = Union["Session", Connection]
"""What a repository runs its statements on."""

_IN_CHUNK = 400
"""Values bound to one ``IN (…)`` of the batch methods: two lists stay under SQLite's oldest limit of 999 variables."""


def _one(result: Result[Any]) -> dict[str, Any] | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


def _all(result: Result[Any]) -> list[dict[str, Any]]:
    return [dict(row) for row in result.mappings()]


_YIELD_PER = 1000
"""Rows fetched at a time by the ``iter_*`` methods (a server-side cursor on PostgreSQL)."""


def _stream(db: Executor, stmt: Select[Any]) -> Iterator[dict[str, Any]]:
    """The rows of ``stmt``, one query fetched ``_YIELD_PER`` rows at a time: memory stays constant."""
    return (dict(row) for row in db.execute(stmt.execution_options(yield_per=_YIELD_PER)).mappings())


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _dialect(db: Executor) -> Dialect:
    return db.dialect if isinstance(db, Connection) else db.get_bind().dialect


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
_USERS = select(*_USER_COLUMNS)
_USER_FIELDS = frozenset({"twitch_user_id", "twitch_login", "display_name", "is_bot"})


class UserRepository:
    """Twitch accounts (bots and channels). Logins are matched case-insensitively."""

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def get_user(self, twitch_user_id: str | int) -> dict[str, Any] | None:
        """The user with this Twitch user id, or None."""
        return _one(self.db.execute(_USERS.where(users.c.twitch_user_id == str(twitch_user_id))))

    def get_user_by_id(self, user_id: int) -> dict[str, Any] | None:
        """The user with this kissbot id (``users.id``), or None."""
        check.check_id(user_id)
        return _one(self.db.execute(_USERS.where(users.c.id == user_id)))

    def get_user_by_login(self, login: str) -> dict[str, Any] | None:
        """The user with this login (any case), or None."""
        check.check_text(login, "login")
        return _one(self.db.execute(_USERS.where(users.c.twitch_login == login.lower())))

    def user_id_for_login(self, login: str) -> int:
        """The kissbot id of ``login``; raise :class:`UserNotFound`."""
        check.check_text(login, "login")
        user_id = self.db.execute(select(users.c.id).where(users.c.twitch_login == login.lower())).scalar()
        if user_id is None:
            raise UserNotFound(f"no user with login {login!r}")
        return user_id

    def create_user(
        self, twitch_user_id: str | int, twitch_login: str, display_name: str | None = None, is_bot: bool = False
    ) -> int:
        """Create a user and return its id; raise :class:`DuplicateUser`."""
        check.check_user_fields(twitch_user_id=twitch_user_id, twitch_login=twitch_login, display_name=display_name)
        twitch_user_id, login = str(twitch_user_id), twitch_login.lower()
        for column, value, what in (
            (users.c.twitch_user_id, twitch_user_id, "Twitch user id"),
            (users.c.twitch_login, login, "login"),
        ):
            if self.db.execute(select(users.c.id).where(column == value)).first() is not None:
                raise DuplicateUser(f"a user with {what} {value!r} already exists")
        now = utcnow()
        stmt = insert(users).values(
            twitch_user_id=twitch_user_id,
            twitch_login=login,
            display_name=display_name,
            is_bot=bool(is_bot),
            created_at=now,
            updated_at=now,
        )
        try:
            user_id = self.db.execute(stmt).inserted_primary_key[0]
        except IntegrityError as exc:
            raise DuplicateUser(f"user {login!r} (Twitch id {twitch_user_id}) already exists") from exc
        AuditRepository(self.db).log_event("user_created", user_id=user_id, details={"login": login, "is_bot": bool(is_bot)})
        return user_id

    def update_user(self, user_id: int, **fields: Any) -> None:
        """Change ``twitch_user_id``, ``twitch_login``, ``display_name`` or ``is_bot``."""
        unknown = set(fields) - _USER_FIELDS
        if unknown:
            raise ValidationError(f"cannot update user field(s) {', '.join(sorted(unknown))}")
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
        found: dict[int, dict[str, Any]] = {}
        for column, values in ((users.c.twitch_user_id, ids), (users.c.twitch_login, lower)):
            for chunk in _chunks(values):
                for user in _all(self.db.execute(_USERS.where(column.in_(chunk)))):
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
        now = utcnow()
        rows = [
            {
                "twitch_user_id": str(u["twitch_user_id"]),
                "twitch_login": u["twitch_login"].lower(),
                "display_name": u.get("display_name"),
                "is_bot": bool(u.get("is_bot", False)),
                "created_at": now,
                "updated_at": now,
            }
            for u in new_users
        ]
        # insertmanyvalues: SQLAlchemy sends the rows as multi-row INSERTs, with RETURNING where
        # the driver has it (SQLite before 3.35 does not: the ids are then read back).
        returning = _dialect(self.db).insert_executemany_returning
        stmt = insert(users).returning(users.c.twitch_user_id, users.c.id) if returning else insert(users)
        try:
            with self.db.begin_nested():
                created = self.db.execute(stmt, rows).all() if returning else self.db.execute(stmt, rows)
        except IntegrityError as exc:
            raise DuplicateUser(f"one of {len(rows)} new users has a Twitch user id or login already taken") from exc
        if returning:
            return {twitch_user_id: user_id for twitch_user_id, user_id in created}
        return {u["twitch_user_id"]: u["id"] for u in self.find_users(twitch_user_ids=[r["twitch_user_id"] for r in rows])}

    def set_display_names(self, names: Mapping[int, str | None]) -> None:
        """Set the ``display_name`` of many users at once, by kissbot id (``users.id``)."""
        if names:
            stmt = (
                update(users)
                .where(users.c.id == bindparam("b_id"))
                .values(display_name=bindparam("b_display"), updated_at=utcnow())
            )
            self.db.execute(stmt, [{"b_id": i, "b_display": n} for i, n in names.items()])

    def list_users(self) -> list[dict[str, Any]]:
        """Every user, ordered by login."""
        return list(self.iter_users())

    def iter_users(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The first ``limit`` users (all: None) by login, streamed from one query."""
        return _stream(self.db, _USERS.order_by(users.c.twitch_login).limit(limit))

    def count(self) -> int:
        """Number of users."""
        return self.db.execute(select(func.count()).select_from(users)).scalar_one()


# --- tokens ------------------------------------------------------------------------------------

TOKEN_TYPES = ("bot", "broadcaster")
_t = oauth_tokens.c
_TOKENS = select(
    _t.user_id,
    _t.token_type,
    _t.access_token_encrypted.label("access_token"),
    _t.refresh_token_encrypted.label("refresh_token"),
    _t.scopes,
    _t.expires_at,
    _t.needs_reauth,
    _t.refresh_failures,
    _t.status,
    _t.version,
    _t.last_refresh,
    _t.last_validated,
    _t.created_at,
    _t.updated_at,
).where(_t.user_id == bindparam("user_id"), _t.token_type == bindparam("token_type"))
_DUE = (
    select(
        _t.user_id,
        _t.token_type,
        users.c.twitch_login,
        _t.expires_at,
        # NULLs become False / 0 in SQL: the rows then need no Python pass.
        func.coalesce(_t.needs_reauth, false()).label("needs_reauth"),
        func.coalesce(_t.refresh_failures, 0).label("refresh_failures"),
    )
    .join(users, users.c.id == _t.user_id)
    .where(_t.expires_at <= bindparam("cutoff"))
    .order_by(_t.expires_at)
)
_TOKEN_LIST = (
    select(
        _t.user_id,
        users.c.twitch_login,
        _t.token_type,
        _t.status,
        _t.scopes,
        _t.expires_at,
        _t.needs_reauth,
        _t.refresh_failures,
        _t.updated_at,
    )
    .join(users, users.c.id == _t.user_id)
    .order_by(users.c.twitch_login, _t.token_type)
)
_CLAIMED = (
    select(
        _t.user_id,
        _t.token_type,
        users.c.twitch_login,
        _t.expires_at,
        func.coalesce(_t.refresh_failures, 0).label("refresh_failures"),
        _t.version,
    )
    .join(users, users.c.id == _t.user_id)
    .order_by(_t.expires_at, _t.id)
)
_TO_VALIDATE = (
    select(_t.user_id, _t.token_type, users.c.twitch_login, _t.expires_at, _t.last_validated)
    .join(users, users.c.id == _t.user_id)
    .where(_t.needs_reauth.is_not(True), _t.last_validated.is_(None) | (_t.last_validated <= bindparam("cutoff")))
    .order_by(_t.user_id, _t.token_type)
)


def _row(user_id: int, token_type: str) -> ColumnElement[bool]:
    return (_t.user_id == user_id) & (_t.token_type == token_type)


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return _t.refresh_lease_owner.is_(None) | (_t.refresh_lease_expires_at < now)


def _scopes_json(scopes: Iterable[str] | None) -> str | None:
    return json.dumps(list(scopes)) if scopes is not None else None


def _decode_scopes(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return raw.split()
    return [str(s) for s in value] if isinstance(value, list) else [str(value)]


def _listed(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A token row as the repository returns it: scopes decoded, NULL flags and counts as False and 0,
    ``expired`` once ``expires_at`` has passed."""
    return {
        **row,
        "scopes": _decode_scopes(row["scopes"]),
        "needs_reauth": bool(row["needs_reauth"]),
        "refresh_failures": row["refresh_failures"] or 0,
        "expired": row["expires_at"] <= now,
    }


def _check_type(token_type: str) -> str:
    if token_type not in TOKEN_TYPES:
        raise ValidationError(f"token_type must be one of {', '.join(TOKEN_TYPES)}, not {token_type!r}")
    return token_type


def _check_tokens(user_id: int, access_token: str, refresh_token: str) -> None:
    for name, value in (("access_token", access_token), ("refresh_token", refresh_token)):
        if not isinstance(value, str) or not value:
            raise ValidationError(f"{name} for user {user_id} must be a non-empty string")


# Every write of a token row: the tokens (encrypted when bound), fresh flags, the key version.
# ``scopes`` NULL keeps the stored scopes on a replace. Built once; a call binds ``b_*`` values.
_WRITTEN = {
    "access_token_encrypted": bindparam("b_access"),
    "refresh_token_encrypted": bindparam("b_refresh"),
    "expires_at": bindparam("b_expires_at"),
    "needs_reauth": False,
    "status": "valid",
    "refresh_failures": 0,
    "key_version": bindparam("b_key_version"),
    "updated_at": bindparam("b_now"),
}
_REPLACE = (
    update(oauth_tokens)
    .where(_t.user_id == bindparam("b_user_id"), _t.token_type == bindparam("b_token_type"))
    .values(**_WRITTEN, scopes=func.coalesce(bindparam("b_scopes"), _t.scopes), version=_t.version + 1,
            last_refresh=bindparam("b_now"))
)
_REPLACE_IF_VERSION = _REPLACE.where(_t.version == bindparam("b_version"))
_INSERT = insert(oauth_tokens).values(
    **_WRITTEN, scopes=bindparam("b_scopes"), user_id=bindparam("b_user_id"), token_type=bindparam("b_token_type"),
    version=1, created_at=bindparam("b_now"),
)


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
        params = {
            "b_user_id": user_id, "b_token_type": token_type, "b_access": access_token, "b_refresh": refresh_token,
            "b_scopes": _scopes_json(scopes), "b_expires_at": now + timedelta(seconds=expires_in), "b_now": now,
            # Read before the values are encrypted: a key file reloaded in between can only
            # make the row's key newer than its label, which rotation fixes.
            "b_key_version": cipher_of(_dialect(self.db)).current_version,
            "b_version": expected_version,
        }
        write = _REPLACE if expected_version is None else _REPLACE_IF_VERSION
        created = self.db.execute(write, params).rowcount == 0
        if created:
            if expected_version is not None:
                current = self.db.execute(select(_t.version).where(_row(user_id, token_type))).scalar()
                if current is not None or expected_version != 0:
                    raise StaleTokens(
                        f"tokens of user {user_id} ({token_type}) are at version {current or 0}, "
                        f"not {expected_version}: another process stored newer tokens"
                    )
            try:
                with self.db.begin_nested():
                    self.db.execute(_INSERT, params)
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
                self.db.execute(_REPLACE, params)
                created = False
        AuditRepository(self.db).log_event(
            "tokens_created" if created else "tokens_refreshed",
            user_id=user_id,
            details={"token_type": token_type, "expires_in": expires_in, "scopes": list(scopes) if scopes is not None else None},
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
        writes it (flags reset, ``version`` bumped, ``scopes=None`` keeping
        the stored scopes), with one UPDATE and one INSERT executed for all
        rows; but no audit event is written: the caller records its own. For a
        single writer (an import in its write transaction): a row another
        transaction inserts meanwhile makes the INSERT fail with ``IntegrityError``.
        """
        _check_type(token_type)
        check.check_expires_in(expires_in)
        now = utcnow()
        shared = {
            "b_token_type": token_type, "b_expires_at": now + timedelta(seconds=expires_in), "b_now": now,
            "b_key_version": cipher_of(_dialect(self.db)).current_version,
        }
        rows = []
        for user_id, access_token, refresh_token, scopes in tokens:
            _check_tokens(user_id, access_token, refresh_token)
            rows.append({**shared, "b_user_id": user_id, "b_access": access_token, "b_refresh": refresh_token,
                         "b_scopes": _scopes_json(scopes)})
        existing: set[int] = set()
        for chunk in _chunks([r["b_user_id"] for r in rows]):
            has_tokens = select(_t.user_id).where(_t.token_type == token_type, _t.user_id.in_(chunk))
            existing.update(self.db.execute(has_tokens).scalars())
        updates = [r for r in rows if r["b_user_id"] in existing]
        inserts = [r for r in rows if r["b_user_id"] not in existing]
        if updates:
            self.db.execute(_REPLACE, updates)
        if inserts:
            self.db.execute(_INSERT, inserts)
        return len(inserts)

    def get_tokens(self, user_id: int, *, token_type: str = "bot") -> dict[str, Any] | None:
        """The decrypted tokens of ``user_id``, or None if it has none.

        ``expired`` is True once ``expires_at`` has passed (``status`` stays
        ``valid`` until a refresh fails: an expired token is refreshable).
        Raises :class:`DecryptionError` naming the user and the row's key
        version if they do not decrypt.
        """
        check.check_id(user_id)
        try:
            tokens = self.db.execute(_TOKENS, {"user_id": user_id, "token_type": token_type}).mappings().first()
        except DecryptionError as exc:
            key_version = self.db.execute(select(_t.key_version).where(_row(user_id, token_type))).scalar()
            raise DecryptionError(
                f"Failed to decrypt tokens for user {user_id} ({settings.describe_key(self.db, key_version)}): "
                "wrong key or corrupted data",
                user_id=user_id,
                key_version=key_version,
            ) from exc
        return _listed(tokens, utcnow()) if tokens is not None else None

    def get_tokens_needing_refresh(self, buffer_minutes: float = 10) -> list[dict[str, Any]]:
        """Tokens expiring within ``buffer_minutes`` (or expired), soonest first; nothing decrypted."""
        check.check_seconds(buffer_minutes, "buffer_minutes", check.MAX_SECONDS / 60)
        return _all(self.db.execute(_DUE, {"cutoff": utcnow() + timedelta(minutes=buffer_minutes)}))

    def mark_tokens_expired(self, user_id: int, *, token_type: str = "bot", revoked: bool = False) -> None:
        """Flag the tokens of ``user_id`` as needing reauthorisation (``expired``, or ``revoked``)."""
        status = "revoked" if revoked else "expired"
        self._update(user_id, token_type, needs_reauth=True, status=status, updated_at=utcnow())
        AuditRepository(self.db).log_event(
            f"tokens_{status}", user_id=user_id, details={"token_type": token_type}, severity="warning"
        )

    def increment_refresh_failures(self, user_id: int, *, token_type: str = "bot") -> int:
        """Count one more failed refresh for ``user_id`` and return the new count."""
        self._update(user_id, token_type, refresh_failures=_t.refresh_failures + 1, updated_at=utcnow())
        return self.db.execute(select(_t.refresh_failures).where(_row(user_id, token_type))).scalar_one()

    def record_validation(self, user_id: int, *, token_type: str = "bot") -> None:
        """Store that Twitch accepted the access token of ``user_id`` just now (``last_validated``)."""
        self._update(user_id, token_type, last_validated=utcnow())

    def _update(self, user_id: int, token_type: str, **values: Any) -> None:
        if self.db.execute(update(oauth_tokens).where(_row(user_id, token_type)).values(**values)).rowcount == 0:
            raise UserNotFound(f"user {user_id} has no {token_type} tokens")

    # The refresh lease: one path for the two ways to take it (a named row, or
    # the due rows), so the worker and a bot refreshing its own token agree.

    def _take_lease(self, where: ColumnElement[bool], owner: str, ttl: float, now: datetime) -> int:
        lease = {"refresh_lease_owner": owner, "refresh_lease_expires_at": now + timedelta(seconds=ttl)}
        return self.db.execute(update(oauth_tokens).where(where).values(**lease)).rowcount

    def claim_refresh(self, user_id: int, owner: str, ttl: float, *, token_type: str = "bot") -> bool:
        """Take the refresh lease of a token row for ``ttl`` seconds; True if ``owner`` now holds it.

        Exactly one owner holds a live lease; an expired lease can be taken
        over, and the holder may extend its own.
        """
        check.check_seconds(ttl, "ttl")
        check.check_text(owner, "owner")
        now = utcnow()
        where = _row(user_id, token_type) & (_lease_free(now) | (_t.refresh_lease_owner == owner))
        return self._take_lease(where, owner, ttl, now) == 1

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
        waiting for them (``FOR UPDATE SKIP LOCKED``; SQLite renders no locking
        clause, its ``BEGIN IMMEDIATE`` already lets one claimer in at a time).
        """
        check.check_seconds(ttl, "ttl")
        check.check_text(owner, "owner")
        check.check_seconds(buffer_minutes, "buffer_minutes", check.MAX_SECONDS / 60)
        check.check_count(limit, "limit", minimum=1)
        now = utcnow()
        due = (
            select(_t.id)
            .where(_t.expires_at <= now + timedelta(minutes=buffer_minutes), _t.needs_reauth.is_not(True), _lease_free(now))
            .order_by(_t.expires_at, _t.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ids = self.db.execute(due).scalars().all()
        if not ids:
            return []
        self._take_lease(_t.id.in_(ids), owner, ttl, now)
        return _all(self.db.execute(_CLAIMED.where(_t.id.in_(ids))))

    def release_refresh(self, user_id: int, owner: str, *, token_type: str = "bot") -> bool:
        """Give back ``owner``'s refresh lease; False if it did not hold it (any more)."""
        stmt = (
            update(oauth_tokens)
            .where(_row(user_id, token_type), _t.refresh_lease_owner == owner)
            .values(refresh_lease_owner=None, refresh_lease_expires_at=None)
        )
        return self.db.execute(stmt).rowcount == 1

    def list_tokens(self, decrypt: bool = False) -> list[dict[str, Any]]:
        """Every token row (each user, each token type) with its login; nothing decrypted unless ``decrypt``.

        With ``decrypt``, each row also holds ``access_token`` and
        ``refresh_token``; a row whose tokens do not decrypt holds None for
        both and ``decrypt_error`` True instead of failing the whole list.
        ``expired`` is True for a token past its ``expires_at``.
        """
        return list(self.iter_tokens(decrypt))

    def iter_tokens(self, decrypt: bool = False, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The first ``limit`` rows of :meth:`list_tokens` (all: None), streamed from one query."""
        stmt = _TOKEN_LIST.limit(limit)
        if decrypt:
            stmt = stmt.add_columns(ciphertext(_t.access_token_encrypted), ciphertext(_t.refresh_token_encrypted))
        now = utcnow()
        for row in _stream(self.db, stmt):
            stored = (row.pop("access_token_encrypted", None), row.pop("refresh_token_encrypted", None))
            listed = _listed(row, now)
            if decrypt:
                try:  # a store without tokens needs no key
                    access, refresh = (Secret(cipher_of(_dialect(self.db)).decrypt(value)) for value in stored)
                except DecryptionError:
                    listed.update(access_token=None, refresh_token=None, decrypt_error=True)
                else:
                    listed.update(access_token=access, refresh_token=refresh, decrypt_error=False)
            yield listed

    def get_tokens_needing_validation(self, max_age_seconds: float) -> list[dict[str, Any]]:
        """Usable tokens not validated within ``max_age_seconds`` (or never); nothing decrypted."""
        check.check_seconds(max_age_seconds, "max_age_seconds")
        return _all(self.db.execute(_TO_VALIDATE, {"cutoff": utcnow() - timedelta(seconds=max_age_seconds)}))

    def written_at(self, user_ids: Sequence[int], *, token_type: str = "bot") -> dict[int, datetime]:
        """When the stored tokens of these users were written (their last refresh, else their creation), by user id."""
        t = _t
        found: dict[int, datetime] = {}
        for chunk in _chunks(list(user_ids)):
            stmt = select(t.user_id, func.coalesce(t.last_refresh, t.created_at, t.updated_at).label("written")).where(
                t.token_type == token_type, t.user_id.in_(chunk)
            )
            found.update((row.user_id, row.written) for row in self.db.execute(stmt))
        return found

    def set_last_validated(self, times: Mapping[int, datetime], *, token_type: str = "bot") -> None:
        """Store when Twitch last accepted each user's access token (``last_validated``), by user id."""
        if times:
            stmt = (
                update(oauth_tokens)
                .where(_t.user_id == bindparam("b_user_id"), _t.token_type == token_type)
                .values(last_validated=bindparam("b_when"))
            )
            self.db.execute(stmt, [{"b_user_id": user_id, "b_when": when} for user_id, when in times.items()])

    def count(self) -> int:
        """Number of token rows."""
        return self.db.execute(select(func.count()).select_from(oauth_tokens)).scalar_one()

    def count_users_with_tokens(self) -> int:
        """Number of users holding at least one token row."""
        return self.db.execute(select(func.count(_t.user_id.distinct()))).scalar_one()

    def count_needing_reauth(self) -> int:
        """Number of token rows flagged ``needs_reauth``."""
        stmt = select(func.count()).select_from(oauth_tokens).where(_t.needs_reauth.is_(True))
        return self.db.execute(stmt).scalar_one()


# --- instances ---------------------------------------------------------------------------------

_INSTANCE_COLUMNS = tuple(instances.c)
_LATEST_INSTANCE = (
    select(instances.c.id, instances.c.status, instances.c.crash_count)
    .where(instances.c.channel_id == bindparam("channel_id"), instances.c.bot_user_id == bindparam("bot_user_id"))
    .order_by(instances.c.id.desc())
    .limit(1)
)
_channel, _bot, _user = users.alias("channel"), users.alias("bot"), users.alias("user")


def _with_logins(*columns: Any) -> Select[Any]:
    """``columns`` of each instance with its ``channel_login`` and ``bot_login``, by instance id."""
    return (
        select(*columns, _channel.c.twitch_login.label("channel_login"), _bot.c.twitch_login.label("bot_login"))
        .join(_channel, _channel.c.id == instances.c.channel_id)
        .join(_bot, _bot.c.id == instances.c.bot_user_id)
        .order_by(instances.c.id)
    )


_INSTANCES_WITH_LOGINS = _with_logins(*_INSTANCE_COLUMNS)
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
        row = self.db.execute(_LATEST_INSTANCE, {"channel_id": channel_id, "bot_user_id": bot_id}).first()
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
        now = utcnow()
        result = self.db.execute(
            update(instances)
            .where(instances.c.id == instance_id, instances.c.status != "disabled")
            .values(last_heartbeat=now, status=status, updated_at=now)
        )
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
        stale = _all(self.db.execute(_with_logins(instances.c.id, instances.c.pid, instances.c.last_heartbeat)
                                     .where(_stale(cutoff))))
        reaped = []
        for row in stale:
            stopped = self._stop(row["id"], crash=True, stale_before=cutoff)
            if stopped is not None:
                reaped.append({**row, **stopped})
        return reaped

    def _stale_cutoff(self) -> datetime:
        interval = settings.value(self.db, "health_check_interval")
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
            limit = settings.value(self.db, "max_crash_count")
            status = "disabled" if crash_count >= limit else "crashed"
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
        return _one(self.db.execute(select(*_INSTANCE_COLUMNS).where(instances.c.id == instance_id)))

    def get_active_instances(self) -> list[dict[str, Any]]:
        """Running instances whose heartbeat is fresh, with the channel and bot logins.

        An instance silent for more than :data:`STALE_HEARTBEATS` health-check
        intervals is left out even before :meth:`reap_stale_instances` marks it.
        """
        return _all(self.db.execute(_INSTANCES_WITH_LOGINS.where(_fresh(self._stale_cutoff()))))

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance, whatever its status, with the channel and bot logins."""
        return _all(self.db.execute(_INSTANCES_WITH_LOGINS))

    def count_active(self) -> int:
        """Number of running instances with a fresh heartbeat (as :meth:`get_active_instances`)."""
        stmt = select(func.count()).select_from(instances).where(_fresh(self._stale_cutoff()))
        return self.db.execute(stmt).scalar_one()


# --- audit log ---------------------------------------------------------------------------------

SEVERITIES = ("info", "warning", "error")
_INSERT_AUDIT = insert(audit_log).inline()  # no implicit RETURNING of the new id on PostgreSQL: nothing reads it


def _check_severity(severity: str) -> None:
    if severity not in SEVERITIES:
        raise ValidationError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")


def _stored_secrets(db: Executor, user_id: int | None) -> list[str]:
    """The tokens stored for ``user_id`` (none if they do not decrypt), for the audit-details guard."""
    if user_id is None:
        return []
    try:
        rows = db.execute(select(_t.access_token_encrypted, _t.refresh_token_encrypted).where(_t.user_id == user_id)).all()
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
        _check_severity(severity)
        details_json = check.audit_details_json(details, lambda: _stored_secrets(self.db, user_id))
        row = {
            "event_type": event_type,
            "user_id": user_id,
            "channel_id": channel_id,
            "details": details_json,
            "severity": severity,
            "timestamp": utcnow(),
        }
        try:
            self.db.execute(_INSERT_AUDIT, row)
        except IntegrityError as exc:
            raise UserNotFound(f"no user with id {user_id if channel_id is None else f'{user_id} or {channel_id}'}") from exc

    def log_events(
        self, event_type: str, events: Iterable[tuple[int | None, dict[str, Any] | None]], severity: str = "info"
    ) -> None:
        """Append one ``event_type`` event per ``(user_id, details)`` in one statement; as :meth:`log_event`."""
        _check_severity(severity)
        now = utcnow()
        rows = [
            {"event_type": event_type, "user_id": user_id, "channel_id": None, "details": check.audit_details_json(details),
             "severity": severity, "timestamp": now}
            for user_id, details in events
        ]
        if rows:
            self.db.execute(_INSERT_AUDIT, rows)

    def get_audit_log(
        self, limit: int = 100, event_type: str | None = None, user_id: int | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events, optionally of one type or one user, ``details`` decoded."""
        return list(self.iter_audit_log(limit, event_type, user_id))

    def iter_audit_log(
        self, limit: int = 100, event_type: str | None = None, user_id: int | None = None, *, logins: bool = False
    ) -> Iterator[dict[str, Any]]:
        """:meth:`get_audit_log` streamed from one query; with ``logins``, each event also has
        ``user_login`` and ``channel_login`` (None without a user or channel)."""
        check.check_count(limit, "limit", minimum=1)
        stmt = select(*audit_log.c).order_by(audit_log.c.timestamp.desc(), audit_log.c.id.desc()).limit(limit)
        if logins:
            stmt = (
                stmt.add_columns(_user.c.twitch_login.label("user_login"), _channel.c.twitch_login.label("channel_login"))
                .outerjoin(_user, _user.c.id == audit_log.c.user_id)
                .outerjoin(_channel, _channel.c.id == audit_log.c.channel_id)
            )
        if event_type is not None:
            stmt = stmt.where(audit_log.c.event_type == event_type)
        if user_id is not None:
            stmt = stmt.where(audit_log.c.user_id == user_id)
        for entry in _stream(self.db, stmt):
            if entry["details"] is not None:
                try:
                    entry["details"] = json.loads(entry["details"])
                except ValueError:
                    pass
            yield entry

    def cleanup_old_logs(self, days: int | None = None) -> int:
        """Delete events older than ``days`` (default: config ``log_retention_days``) in one statement; return how many."""
        return self.delete_logs_before(self.retention_cutoff(days))[0]

    def retention_cutoff(self, days: int | None = None) -> datetime:
        """Now less ``days`` (default: config ``log_retention_days``): the events before it are due for deletion."""
        if days is None:
            days = settings.value(self.db, "log_retention_days")
        check.check_count(days, "days", maximum=check.MAX_DAYS)
        return utcnow() - timedelta(days=days)

    def delete_logs_before(
        self, cutoff: datetime, batch_size: int | None = None, after: tuple[datetime, int] | None = None
    ) -> tuple[int, tuple[datetime, int] | None]:
        """Delete the events older than ``cutoff``: all, or the oldest ``batch_size`` after ``after``.

        A batch is a range of ``idx_audit_timestamp`` that starts at ``after``, the
        ``(timestamp, id)`` this returned for the previous batch, so it does not
        walk again over the entries of the rows deleted before it (PostgreSQL
        keeps them until a vacuum). Returns the number deleted and the ``after``
        of the next batch, None when no older event is left.
        """
        key = tuple_(audit_log.c.timestamp, audit_log.c.id)
        where = audit_log.c.timestamp < cutoff
        if after is not None:
            where &= (audit_log.c.timestamp >= after[0]) & (key > tuple_(*after))
        last = None
        if batch_size is not None:
            check.check_count(batch_size, "batch_size", minimum=1)
            oldest = select(audit_log.c.timestamp, audit_log.c.id).where(where).order_by(audit_log.c.timestamp, audit_log.c.id)
            last = self.db.execute(oldest.offset(batch_size - 1).limit(1)).first()
            if last is not None:
                where &= (audit_log.c.timestamp <= last[0]) & (key <= tuple_(*last))
        deleted = self.db.execute(delete(audit_log).where(where)).rowcount
        return deleted, (last[0], last[1]) if last is not None else None

    def count(self) -> int:
        """Number of audit events."""
        return self.db.execute(select(func.count()).select_from(audit_log)).scalar_one()


# --- config ------------------------------------------------------------------------------------


class ConfigRepository:
    """System settings. Values are stored as text and read back with their JSON type.

    The keys kissbot reads are typed and checked on write and on read (:mod:`kissbot.settings`).
    """

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def get_config(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (``"60"`` reads as 60), or ``default``; a corrupt known setting raises :class:`CorruptConfig`."""
        raw = self.db.execute(select(config.c.value).where(config.c.key == key)).scalar()
        return default if raw is None else settings.decode(key, raw)

    def set_config(self, key: str, value: Any, description: str | None = None) -> None:
        """Set ``key`` to ``value``; strings are stored as given, anything else as JSON.

        Raises :class:`ConfigurationError` for an internal key or a value out of a known key's type and range.
        """
        text = settings.checked(key, value)
        values: dict[str, Any] = {"value": text, "updated_at": utcnow()}
        if description is not None:
            values["description"] = description
        if self.db.execute(update(config).where(config.c.key == key).values(**values)).rowcount == 0:
            self.db.execute(insert(config).values(key=key, **values))

    def list_config(self) -> list[dict[str, Any]]:
        """Every setting, by key, values decoded (a corrupt known setting as its stored text)."""
        rows = self.db.execute(select(*config.c).order_by(config.c.key)).mappings()
        return [{**r, "value": settings.decode(r["key"], r["value"], strict=False)} for r in rows]
