"""Repositories: the store's API over one session or connection.

Each repository wraps a :class:`~sqlalchemy.orm.Session` or a Core
:class:`~sqlalchemy.engine.Connection` and runs the same statements on
either with ``execute()``; it never commits, never opens a connection, and
returns plain dicts. Token columns are :class:`~kissbot.types.EncryptedString`:
they are encrypted when bound and decrypted when read, and only selected
where the caller asked for the tokens.

This module holds the users and tokens; the audit trail
(:mod:`kissbot.audit`), the bot instances (:mod:`kissbot.instances`) and the
settings (:mod:`kissbot.settings`) have their own, re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Result, bindparam, case, false, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from kissbot import settings
from kissbot import validation as check
from kissbot.audit import SEVERITIES, AuditRepository
from kissbot.errors import DecryptionError, DuplicateUser, StaleTokens, UserNotFound, ValidationError
from kissbot.instances import STALE_HEARTBEATS, InstanceRepository
from kissbot.models import oauth_tokens, users
from kissbot.settings import ConfigRepository, Executor, dialect_of, stream
from kissbot.types import Secret, cipher_of, ciphertext, utcnow

__all__ = [
    "SEVERITIES", "STALE_HEARTBEATS", "TOKEN_TYPES", "AuditRepository", "ConfigRepository", "Executor",
    "InstanceRepository", "TokenRepository", "UserRepository",
]

_IN_CHUNK = 400
"""Values bound to one ``IN (…)`` of the batch methods: two lists stay under SQLite's oldest limit of 999 variables."""


def _one(result: Result[Any]) -> dict[str, Any] | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


def _all(result: Result[Any]) -> list[dict[str, Any]]:
    return [dict(row) for row in result.mappings()]


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


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
        returning = dialect_of(self.db).insert_executemany_returning
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

    def mark_bots(self, ids: Iterable[int]) -> None:
        """Set ``is_bot`` on many users at once, by kissbot id (``users.id``)."""
        for chunk in _chunks(list(ids)):
            self.db.execute(update(users).where(users.c.id.in_(chunk)).values(is_bot=True, updated_at=utcnow()))

    def list_users(self) -> list[dict[str, Any]]:
        """Every user, ordered by login."""
        return list(self.iter_users())

    def iter_users(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The first ``limit`` users (all: None) by login, streamed from one query."""
        return stream(self.db, _USERS.order_by(users.c.twitch_login).limit(limit))

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
_CLAIMED_CIPHERTEXT = _CLAIMED.add_columns(
    _t.updated_at, ciphertext(_t.access_token_encrypted), ciphertext(_t.refresh_token_encrypted)
)
_TO_VALIDATE = (
    select(_t.user_id, _t.token_type, users.c.twitch_login, _t.expires_at, _t.last_validated)
    .join(users, users.c.id == _t.user_id)
    .where(_t.needs_reauth.is_not(True), _t.last_validated.is_(None) | (_t.last_validated <= bindparam("cutoff")))
    .order_by(_t.user_id, _t.token_type)
)


def _row(user_id: int, token_type: str) -> ColumnElement[bool]:
    """The token row of ``user_id`` and ``token_type``, both checked (:class:`ValidationError`)."""
    return (_t.user_id == check.check_id(user_id)) & (_t.token_type == _check_type(token_type))


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
        raise ValidationError(f"token_type must be one of {', '.join(TOKEN_TYPES)}, not {check.echo(token_type)}")
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
# The same, also giving back ``b_owner``'s refresh lease (another owner's stays) and recording the new tokens validated.
_HELD_BY_OWNER = _t.refresh_lease_owner == bindparam("b_owner")
_RELEASED = {
    "refresh_lease_owner": case((_HELD_BY_OWNER, None), else_=_t.refresh_lease_owner),
    "refresh_lease_expires_at": case((_HELD_BY_OWNER, None), else_=_t.refresh_lease_expires_at),
    "last_validated": bindparam("b_now"),
}
_WRITES = {
    (False, False): _REPLACE, (True, False): _REPLACE_IF_VERSION,
    (False, True): _REPLACE.values(**_RELEASED), (True, True): _REPLACE_IF_VERSION.values(**_RELEASED),
}
_INSERT = insert(oauth_tokens).values(
    **_WRITTEN, scopes=bindparam("b_scopes"), user_id=bindparam("b_user_id"), token_type=bindparam("b_token_type"),
    version=1, created_at=bindparam("b_now"),
)


_RELEASE = (
    update(oauth_tokens)
    .where(_t.user_id == bindparam("b_user_id"), _t.token_type == bindparam("b_token_type"),
           _t.refresh_lease_owner == bindparam("b_owner"))
    .values(refresh_lease_owner=None, refresh_lease_expires_at=None)
)
_RELEASE_VALIDATED = _RELEASE.values(last_validated=bindparam("b_now"))


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
        release_lease: str | None = None,
    ) -> bool:
        """Insert or replace the tokens of ``user_id``; return True if they are new.

        Resets ``needs_reauth``, ``status`` and ``refresh_failures``, bumps the
        row's ``version`` and writes one audit event (``tokens_created`` or
        ``tokens_refreshed``) without any secret. ``scopes=None`` keeps the
        stored scopes (an explicit ``[]`` clears them). With ``expected_version``, the
        write only happens if the stored row is still at that version (or, for
        ``0``, does not exist yet); otherwise :class:`StaleTokens` is raised and
        the newer tokens are kept. With ``release_lease``, the same statement
        gives back that owner's refresh lease (see :meth:`release_refresh`) and
        records the new access token as validated now, as a refresh worker does
        with the tokens Twitch just issued.
        """
        _check_type(token_type)
        check.check_id(user_id)
        _check_tokens(user_id, access_token, refresh_token)
        check.check_expires_in(expires_in)
        scopes = check.check_scopes(scopes)
        if expected_version is not None:
            check.check_count(expected_version, "expected_version")
        if release_lease is not None:
            check.check_text(release_lease, "release_lease")
        now = utcnow()
        params = {
            "b_user_id": user_id, "b_token_type": token_type, "b_access": access_token, "b_refresh": refresh_token,
            "b_scopes": _scopes_json(scopes), "b_expires_at": now + timedelta(seconds=expires_in), "b_now": now,
            # Read before the values are encrypted: a key file reloaded in between can only
            # make the row's key newer than its label, which rotation fixes.
            "b_key_version": cipher_of(dialect_of(self.db)).current_version,
            "b_version": expected_version,
            "b_owner": release_lease,
        }
        audit = AuditRepository(self.db)
        details = {"token_type": token_type, "expires_in": expires_in, "scopes": scopes}
        details_json = audit.details_json(details, user_id, secrets=(access_token, refresh_token))
        write = _WRITES[expected_version is not None, release_lease is not None]
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
        audit.append("tokens_created" if created else "tokens_refreshed", user_id, None, details_json)
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
            "b_key_version": cipher_of(dialect_of(self.db)).current_version,
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
        _check_type(token_type)
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
        self, owner: str, ttl: float, buffer_minutes: float = 10, limit: int = 100, *, with_ciphertext: bool = False
    ) -> list[dict[str, Any]]:
        """Take the refresh lease of up to ``limit`` due tokens for ``ttl`` seconds and return them.

        A token is due when it expires within ``buffer_minutes`` (or has
        expired), does not need reauthorisation, and its lease is free or
        expired: a live lease, even ``owner``'s own, is not handed out again.
        Rows come soonest-expiring first with ``user_id``, ``token_type``,
        ``twitch_login``, ``expires_at``, ``refresh_failures`` and ``version``;
        nothing is decrypted. With ``with_ciphertext``, rows also hold ``updated_at``
        and the stored Fernet text of both tokens (``access_token_encrypted``,
        ``refresh_token_encrypted``), for the caller to decrypt row by row
        (one undecryptable row then fails only itself). Two claimers never get the same row, and on
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
        claimed = _CLAIMED_CIPHERTEXT if with_ciphertext else _CLAIMED
        return _all(self.db.execute(claimed.where(_t.id.in_(ids))))

    def release_refresh(self, user_id: int, owner: str, *, token_type: str = "bot", validated: bool = False) -> bool:
        """Give back ``owner``'s refresh lease; False if it did not hold it (any more).

        With ``validated``, the same statement records that Twitch accepted the
        access token just now (``last_validated``), as a worker does after a
        refresh or a validation.
        """
        check.check_id(user_id)
        _check_type(token_type)
        check.check_text(owner, "owner")
        params = {"b_user_id": user_id, "b_token_type": token_type, "b_owner": owner}
        if validated:
            return self.db.execute(_RELEASE_VALIDATED, {**params, "b_now": utcnow()}).rowcount == 1
        return self.db.execute(_RELEASE, params).rowcount == 1

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
        for row in stream(self.db, stmt):
            stored = (row.pop("access_token_encrypted", None), row.pop("refresh_token_encrypted", None))
            listed = _listed(row, now)
            if decrypt:
                try:  # a store without tokens needs no key
                    access, refresh = (Secret(cipher_of(dialect_of(self.db)).decrypt(value)) for value in stored)
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
