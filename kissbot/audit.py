"""The audit trail: events without secrets, newest first.

:class:`AuditRepository` is the repository every other one writes its events
through (:mod:`kissbot.repo` re-exports it). It runs on a
:class:`~sqlalchemy.orm.Session` or a :class:`~sqlalchemy.engine.Connection`
and never commits. ``details`` are checked by
:func:`kissbot.validation.audit_details_json`: no token, key or secret, and not
the tokens stored for the event's user.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError

from kissbot import settings
from kissbot import validation as check
from kissbot.errors import DecryptionError, UserNotFound, ValidationError
from kissbot.models import audit_log, oauth_tokens, users
from kissbot.settings import Executor, dialect_of
from kissbot.types import utcnow

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
        tokens = oauth_tokens.c
        rows = db.execute(
            select(tokens.access_token_encrypted, tokens.refresh_token_encrypted).where(tokens.user_id == user_id)
        ).all()
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
        check.check_optional_id(user_id, "user_id")
        self.append(event_type, user_id, channel_id, self.details_json(details, user_id), severity)

    def details_json(
        self, details: dict[str, Any] | None, user_id: int | None, *, secrets: Iterable[str] = ()
    ) -> str | None:
        """``details`` checked and as JSON, for :meth:`append`: neither a secret nor a token stored for ``user_id``.

        ``secrets`` (the tokens a write is about to store) are refused as the stored ones are. A write makes
        its details before its transaction begins: no lock is held while they are checked.
        """
        return check.audit_details_json(details, lambda: [*secrets, *_stored_secrets(self.db, user_id)])

    def append(
        self, event_type: str, user_id: int | None, channel_id: int | None, details: str | None, severity: str = "info"
    ) -> None:
        """Insert one event whose ``details`` :meth:`details_json` made; :class:`UserNotFound` if a user is missing."""
        check.check_text(event_type, "event_type")
        check.check_optional_id(user_id, "user_id")
        check.check_optional_id(channel_id, "channel_id")
        _check_severity(severity)
        row = {
            "event_type": event_type,
            "user_id": user_id,
            "channel_id": channel_id,
            "details": details,
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
        """:meth:`get_audit_log` streamed from one query; with ``logins``,
        each event also has ``user_login`` and ``channel_login`` (None without a user or channel)."""
        check.check_count(limit, "limit", minimum=1)
        check.check_optional_id(user_id, "user_id")
        if event_type is not None:
            check.check_text(event_type, "event_type")
        stmt = select(*audit_log.c).order_by(audit_log.c.timestamp.desc(), audit_log.c.id.desc()).limit(limit)
        if logins:
            user, channel = users.alias("user"), users.alias("channel")
            stmt = (
                stmt.add_columns(user.c.twitch_login.label("user_login"), channel.c.twitch_login.label("channel_login"))
                .outerjoin(user, user.c.id == audit_log.c.user_id)
                .outerjoin(channel, channel.c.id == audit_log.c.channel_id)
            )
        if event_type is not None:
            stmt = stmt.where(audit_log.c.event_type == event_type)
        if user_id is not None:
            stmt = stmt.where(audit_log.c.user_id == user_id)
        for entry in settings.stream(self.db, stmt):
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
            if dialect_of(self.db).name == "sqlite":
                # SQLite bounds a (timestamp, id) range on timestamp alone: bounded by the last
                # (timestamp, id), the DELETE would walk every remaining event of that timestamp.
                where = audit_log.c.id.in_(oldest.with_only_columns(audit_log.c.id).limit(batch_size))
            elif last is not None:
                where &= (audit_log.c.timestamp <= last[0]) & (key <= tuple_(*last))
        deleted = self.db.execute(delete(audit_log).where(where)).rowcount
        return deleted, (last[0], last[1]) if last is not None else None

    def count(self) -> int:
        """Number of audit events."""
        return self.db.execute(select(func.count()).select_from(audit_log)).scalar_one()
