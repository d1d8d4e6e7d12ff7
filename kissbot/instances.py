"""Bot processes: registration, heartbeats, stops, crash counting and the reaping of silent ones.

:class:`InstanceRepository` (re-exported by :mod:`kissbot.repo`) runs on a
:class:`~sqlalchemy.orm.Session` or a :class:`~sqlalchemy.engine.Connection`
and never commits. An instance is one bot login on one channel; crashes count
toward the config ``max_crash_count``, after which the instance is
``disabled`` until ``kissbot instances reset``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, bindparam, func, insert, select, update

from kissbot import settings
from kissbot import validation as check
from kissbot.audit import AuditRepository
from kissbot.errors import InstanceDisabled, InstanceNotFound, UserNotFound
from kissbot.models import instances, users
from kissbot.settings import Executor
from kissbot.types import utcnow

_INSTANCE_COLUMNS = tuple(instances.c)
_LATEST_INSTANCE = (
    select(instances.c.id, instances.c.status, instances.c.crash_count)
    .where(instances.c.channel_id == bindparam("channel_id"), instances.c.bot_user_id == bindparam("bot_user_id"))
    .order_by(instances.c.id.desc())
    .limit(1)
)
_channel, _bot = users.alias("channel"), users.alias("bot")


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


def _user_id(db: Executor, login: str) -> int:
    check.check_text(login, "login")
    user_id = db.execute(select(users.c.id).where(users.c.twitch_login == login.lower())).scalar()
    if user_id is None:
        raise UserNotFound(f"no user with login {login!r}")
    return user_id


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
        channel_id, bot_id = _user_id(self.db, channel_login), _user_id(self.db, bot_login)
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
        stale = self.db.execute(
            _with_logins(instances.c.id, instances.c.pid, instances.c.last_heartbeat).where(_stale(cutoff))
        ).mappings()
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
        row = self.db.execute(select(*_INSTANCE_COLUMNS).where(instances.c.id == instance_id)).mappings().first()
        return dict(row) if row is not None else None

    def get_active_instances(self) -> list[dict[str, Any]]:
        """Running instances whose heartbeat is fresh, with the channel and bot logins.

        An instance silent for more than :data:`STALE_HEARTBEATS` health-check
        intervals is left out even before :meth:`reap_stale_instances` marks it.
        """
        return [dict(row) for row in self.db.execute(_INSTANCES_WITH_LOGINS.where(_fresh(self._stale_cutoff()))).mappings()]

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance, whatever its status, with the channel and bot logins."""
        return [dict(row) for row in self.db.execute(_INSTANCES_WITH_LOGINS).mappings()]

    def count_active(self) -> int:
        """Number of running instances with a fresh heartbeat (as :meth:`get_active_instances`)."""
        stmt = select(func.count()).select_from(instances).where(_fresh(self._stale_cutoff()))
        return self.db.execute(stmt).scalar_one()
