"""The store's settings (the ``config`` table): every key kissbot reads, with its type, range and meaning.

Values are checked where they are written (:func:`checked`, which
:meth:`ConfigRepository.set_config`
calls) and where kissbot reads them (:func:`value`). A value that is not
valid for its key (written before this check existed, or by hand in SQL)
never stops a store from opening: the code that needs it raises
:class:`~kissbot.errors.CorruptConfig`, one line naming the key and the
command that fixes it, and ``kissbot doctor`` reports it (:func:`problems`).

Internal keys (``encryption_key_version``, ``key_fingerprint_v<N>``) are
written by :mod:`kissbot.keys` only; ``set_config`` refuses them.
Keys not in :data:`SETTINGS` are the bot's own and hold any JSON value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from sqlalchemy import Select, bindparam, insert, inspect, select, update
from sqlalchemy.engine import Connection, Dialect

from kissbot.crypto import MAX_KEY_VERSION
from kissbot.errors import ConfigurationError, CorruptConfig
from kissbot.models import config, oauth_tokens
from kissbot.types import utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Executor = Union["Session", Connection]
"""What a repository runs its statements on (this module's :class:`ConfigRepository`, and :mod:`kissbot.repo`'s)."""


def dialect_of(db: Executor) -> Dialect:
    """The dialect of a Connection or a Session."""
    return db.dialect if isinstance(db, Connection) else db.get_bind().dialect


YIELD_PER = 1000
"""Rows the repositories' ``iter_*`` methods fetch at a time."""


def stream(db: Executor, stmt: Select[Any]) -> Iterator[dict[str, Any]]:
    """The rows of ``stmt`` from one query, fetched :data:`YIELD_PER` at a time (a server-side cursor on PostgreSQL).

    A PostgreSQL cursor lives in a transaction: on an autocommit connection the rows are fetched at once.
    """
    if not (isinstance(db, Connection) and db.get_execution_options().get("isolation_level") == "AUTOCOMMIT"):
        stmt = stmt.execution_options(yield_per=YIELD_PER)
    return (dict(row) for row in db.execute(stmt).mappings())

FINGERPRINT_PREFIX = "key_fingerprint_v"
_INTEGER = re.compile(r"^[+-]?[0-9]{1,20}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
_SHOWN = 24


@dataclass(frozen=True)
class Setting:
    """One known config key: an integer between ``minimum`` and ``maximum``, ``default`` when unset."""

    key: str
    default: int
    minimum: int
    maximum: int
    description: str
    fix: str | None = None
    """Set for an internal key (only kissbot writes it): the command that repairs a corrupt value."""

    @property
    def internal(self) -> bool:
        """True if only kissbot writes it."""
        return self.fix is not None

    @property
    def expected(self) -> str:
        """What a valid value is, for messages."""
        return f"an integer from {self.minimum} to {self.maximum}"

    def parse(self, raw: Any) -> int | None:
        """``raw`` (a stored text or a Python value) as this setting's integer, or None if it is not valid."""
        if isinstance(raw, bool):
            return None
        if isinstance(raw, str):
            if not _INTEGER.match(raw.strip()):
                return None
            raw = int(raw)
        if not isinstance(raw, int) or not self.minimum <= raw <= self.maximum:
            return None
        return raw

    @property
    def repair(self) -> str:
        """The command that repairs a corrupt value."""
        return self.fix or f"kissbot config set {self.key} {self.default}"


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("encryption_key_version", 1, 1, MAX_KEY_VERSION, "Version de la clé Fernet",
                fix="kissbot key rotate (it records the version again)"),
        Setting("token_refresh_interval", 60, 0, 86_400, "Secondes avant expiration"),
        Setting("health_check_interval", 30, 1, 86_400, "Secondes entre checks"),
        Setting("max_crash_count", 3, 1, 1_000, "Crashes avant désactivation"),
        Setting("log_retention_days", 30, 0, 36_500, "Rétention des audit logs"),
        Setting("max_refresh_failures", 3, 1, 1_000, "Échecs de refresh transitoires avant réautorisation"),
        Setting("token_validate_interval", 3_600, 0, 604_800, "Secondes entre deux validations d'un token"),
    )
}
"""Every config key kissbot reads, by key."""


def _shown(raw: Any) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, default=repr)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def is_internal(key: str) -> bool:
    """True for the keys only kissbot writes: ``encryption_key_version`` and ``key_fingerprint_v<N>``."""
    setting = SETTINGS.get(key)
    return key.startswith(FINGERPRINT_PREFIX) or (setting is not None and setting.internal)


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigurationError("a config key must be a non-empty string")
    return key


def checked(key: str, value: Any) -> str:
    """The text to store for ``key`` = ``value``; raise :class:`~kissbot.errors.ConfigurationError` if refused.

    Known keys take an integer in their range (``"60"`` or ``60``); internal
    keys are refused; other keys take a string (stored as given) or any JSON value.
    """
    folded = _check_key(key).strip().lower()
    if key != folded and (folded in SETTINGS or folded.startswith(FINGERPRINT_PREFIX)):
        raise ConfigurationError(f"config {key!r} is not kissbot's {folded}: write it as {folded}")
    if is_internal(key):
        raise ConfigurationError(
            f"config {key} is kept by kissbot and cannot be set; see kissbot key status"
        )
    setting = SETTINGS.get(key)
    if setting is None:
        if isinstance(value, str):
            return value
        try:
            return json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"config {key}: the value is not JSON ({exc})") from exc
    parsed = setting.parse(value)
    if parsed is None:
        raise ConfigurationError(
            f"config {key} must be {setting.expected} ({setting.description}), not {_shown(value)}"
        )
    return str(parsed)


def decode(key: str, raw: str, *, strict: bool = True) -> Any:
    """A stored text as its value: a known key's integer, else its JSON value or the text itself.

    A known key's invalid value raises :class:`~kissbot.errors.CorruptConfig`,
    or with ``strict=False`` comes back as the stored text (for listings).
    """
    setting = SETTINGS.get(key)
    if setting is not None:
        parsed = setting.parse(raw)
        if parsed is not None or not strict:
            return raw if parsed is None else parsed
        return _parse_stored(setting, raw)
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_stored(setting: Setting, raw: Any) -> int:
    parsed = setting.parse(raw)
    if parsed is None:
        raise CorruptConfig(
            f"config {setting.key} holds {_shown(raw)}, not {setting.expected}",
            key=setting.key, fix=f"fix it with {setting.repair}",
        )
    return parsed


_VALUE = select(config.c.value).where(config.c.key == bindparam("p_key"))


def value(db: Any, key: str, *, strict: bool = True) -> int:
    """The known setting ``key`` read through ``db`` (a Connection or Session), or its default if unset.

    Raises :class:`~kissbot.errors.CorruptConfig` if the stored value is not
    valid, or with ``strict=False`` gives the default (for a diagnosis that
    reports the value itself, see :func:`problems`).
    """
    setting = SETTINGS[key]
    raw = db.execute(_VALUE, {"p_key": key}).scalar()
    if raw is None:
        return setting.default
    parsed = setting.parse(raw)
    if parsed is None and not strict:
        return setting.default
    return _parse_stored(setting, raw)


def problems(db: Any) -> list[CorruptConfig]:
    """Every stored known setting (and key fingerprint) whose value is not valid, by key."""
    rows = db.execute(select(config.c.key, config.c.value).order_by(config.c.key)).all()
    found = []
    for key, raw in rows:
        if key in SETTINGS:
            try:
                _parse_stored(SETTINGS[key], raw)
            except CorruptConfig as exc:
                found.append(exc)
        elif key.startswith(FINGERPRINT_PREFIX) and not is_fingerprint(raw):
            found.append(
                CorruptConfig(
                    f"config {key} holds {_shown(raw)}, not a key fingerprint (16 hex digits)",
                    key=key, fix="kissbot ignores it and records the key's fingerprint again when a bot opens the store",
                )
            )
    return found


def is_fingerprint(raw: Any) -> bool:
    """True if ``raw`` looks like a fingerprint kissbot records (16 lowercase hex digits)."""
    return isinstance(raw, str) and bool(_FINGERPRINT.match(raw))


def fingerprint_version(key: str) -> int | None:
    """The key version of a ``key_fingerprint_v<N>`` key, or None."""
    suffix = key[len(FINGERPRINT_PREFIX):] if key.startswith(FINGERPRINT_PREFIX) else ""
    if not suffix.isdigit() or len(suffix) > 10:
        return None
    version = int(suffix)
    return version if 1 <= version <= MAX_KEY_VERSION else None


def describe_key(db: Any, version: int | None) -> str:
    """``key version 2, fingerprint 0123456789abcdef``: the key a token row needs, as errors name it.

    The fingerprint is the one the store recorded for ``version`` (through
    ``db``, a Connection or Session), left out if it recorded none.
    """
    recorded = db.execute(_VALUE, {"p_key": f"{FINGERPRINT_PREFIX}{version}"}).scalar() if version else None
    return f"key version {version}" + (f", fingerprint {recorded}" if is_fingerprint(recorded) else "")


def needed_keys(conn: Connection, user_ids: Iterable[int]) -> str:
    """``key version 1 (fingerprint 0123456789abcdef)``, … for the token rows of ``user_ids``, as errors name them.

    ``conn`` may be on a backup of any known migration: a store from before
    key versions needs version 1.
    """
    if any(c["name"] == "key_version" for c in inspect(conn).get_columns("oauth_tokens")):
        used = select(oauth_tokens.c.key_version).distinct().where(oauth_tokens.c.user_id.in_(list(user_ids)))
        versions = list(conn.execute(used.order_by(oauth_tokens.c.key_version)).scalars())
    else:
        versions = [1]
    fingerprints = select(config.c.key, config.c.value).where(config.c.key.startswith(FINGERPRINT_PREFIX, autoescape=True))
    recorded = dict(conn.execute(fingerprints).all())
    shown = []
    for version in versions:
        fp = recorded.get(f"{FINGERPRINT_PREFIX}{version}")
        shown.append(f"key version {version}" + (f" (fingerprint {fp})" if is_fingerprint(fp) else ""))
    return ", ".join(shown)


class ConfigRepository:
    """System settings. Values are stored as text and read back with their JSON type.

    The keys kissbot reads are typed and checked on write and on read (:mod:`kissbot.settings`).
    """

    __slots__ = ("db",)

    def __init__(self, db: Executor) -> None:
        self.db = db

    def get_config(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (``"60"`` reads as 60), or ``default``; a corrupt known setting raises :class:`CorruptConfig`."""
        raw = self.db.execute(select(config.c.value).where(config.c.key == _check_key(key))).scalar()
        return default if raw is None else decode(key, raw)

    def set_config(self, key: str, value: Any, description: str | None = None) -> None:
        """Set ``key`` to ``value``; strings are stored as given, anything else as JSON.

        Raises :class:`ConfigurationError` for an internal key or a value out of a known key's type and range.
        """
        text = checked(key, value)
        if description is not None and not isinstance(description, str):
            raise ConfigurationError(f"a config description must be a string, not {type(description).__name__}")
        values: dict[str, Any] = {"value": text, "updated_at": utcnow()}
        if description is not None:
            values["description"] = description
        if self.db.execute(update(config).where(config.c.key == key).values(**values)).rowcount == 0:
            self.db.execute(insert(config).values(key=key, **values))

    def list_config(self) -> list[dict[str, Any]]:
        """Every setting, by key, values decoded (a corrupt known setting as its stored text)."""
        rows = self.db.execute(select(*config.c).order_by(config.c.key)).mappings()
        return [{**r, "value": decode(r["key"], r["value"], strict=False)} for r in rows]
