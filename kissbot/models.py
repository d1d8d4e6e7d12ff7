"""Declarative ORM classes mapped onto the Core tables of :mod:`kissbot.schema`.

For code that wants a :class:`~sqlalchemy.orm.Session` and objects; the
library itself uses the tables only, so importing it does not import the ORM.
The tables are also importable from here (``kissbot.models.users`` is
``kissbot.schema.users``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import DeclarativeBase, Mapped

from kissbot.schema import NAMING_CONVENTION, audit_log, config, instances, metadata, oauth_tokens, users

__all__ = [
    "NAMING_CONVENTION", "Base", "User", "OAuthToken", "Instance", "AuditLog", "Config",
    "users", "oauth_tokens", "instances", "audit_log", "config",
]


class Base(DeclarativeBase):
    """Declarative base sharing :data:`kissbot.schema.metadata` (with its naming convention)."""

    metadata = metadata


class User(Base):
    """A Twitch account: a bot or a channel. Logins are stored lowercase."""

    __table__ = users

    id: Mapped[int]
    twitch_user_id: Mapped[str]
    twitch_login: Mapped[str]
    display_name: Mapped[str | None]
    is_bot: Mapped[bool | None]
    created_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<User id={self.id} login={self.twitch_login!r}>"


class OAuthToken(Base):
    """A user's OAuth tokens of one type (``bot`` or ``broadcaster``), both encrypted at rest.

    ``status`` is ``valid``, ``expired`` or ``revoked``; ``needs_reauth`` is
    true exactly when it is not ``valid``. ``version`` grows by one on every
    write of the tokens (compare-and-set); the refresh lease lets one process
    refresh the row at a time; ``key_version`` names the key that encrypted it.
    """

    __table__ = oauth_tokens

    id: Mapped[int]
    user_id: Mapped[int]
    access_token_encrypted: Mapped[str]
    refresh_token_encrypted: Mapped[str]
    scopes: Mapped[str | None]
    expires_at: Mapped[datetime]
    needs_reauth: Mapped[bool | None]
    refresh_failures: Mapped[int | None]
    created_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]
    token_type: Mapped[str]
    status: Mapped[str]
    last_refresh: Mapped[datetime | None]
    last_validated: Mapped[datetime | None]
    version: Mapped[int]
    refresh_lease_owner: Mapped[str | None]
    refresh_lease_expires_at: Mapped[datetime | None]
    key_version: Mapped[int]

    def __repr__(self) -> str:
        return f"<OAuthToken user_id={self.user_id} type={self.token_type} expires_at={self.expires_at}>"


class Instance(Base):
    """A bot process serving one channel."""

    __table__ = instances

    id: Mapped[int]
    channel_id: Mapped[int]
    bot_user_id: Mapped[int]
    status: Mapped[str]
    pid: Mapped[int | None]
    start_time: Mapped[datetime | None]
    stop_time: Mapped[datetime | None]
    last_heartbeat: Mapped[datetime | None]
    crash_count: Mapped[int | None]
    config_overrides: Mapped[str | None]
    created_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<Instance id={self.id} status={self.status!r} pid={self.pid}>"


class AuditLog(Base):
    """One audit event. ``details`` is JSON and never holds a secret."""

    __table__ = audit_log

    id: Mapped[int]
    event_type: Mapped[str]
    user_id: Mapped[int | None]
    channel_id: Mapped[int | None]
    details: Mapped[str | None]
    severity: Mapped[str | None]
    timestamp: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<AuditLog id={self.id} event_type={self.event_type!r}>"


class Config(Base):
    """A system setting (key/value)."""

    __table__ = config

    key: Mapped[str]
    value: Mapped[str]
    description: Mapped[str | None]
    updated_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<Config key={self.key!r}>"
