"""Prometheus metrics of a store, read on each scrape.

:class:`StoreCollector` is a ``prometheus_client`` collector: every scrape
runs a few aggregate queries (one pass over ``oauth_tokens``, one over the
``audit_log`` event-type index, the small ``instances`` table) and stats the
database files. It reads no encrypted column and needs no key, so no token,
secret or key material can reach the exposition. Label values that come from
the store (token types, event types, channel logins) are bounded: at most
``max_*`` series each, anything not shaped like an identifier is counted as
``other``.

:class:`RefreshMetrics` holds the refresh worker's own counters and latency
histogram (``kissbot refresh-worker --metrics-port``): refresh.py reports to it
through its ``observer`` hook and never imports prometheus_client.

Requires the ``metrics`` extra (``pip install 'kissbot[metrics]'``).
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy
from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from kissbot import __version__
from kissbot.engine import connect_sqlite_query_only, create_engine, sqlite_path
from kissbot.urls import existing_store
from kissbot.errors import ConfigurationError, KissbotError, driver_message
from kissbot.instances import STALE_HEARTBEATS
from kissbot.migrations import current_revision, ensure_schema
from kissbot.models import audit_log, instances, oauth_tokens, users
from kissbot.settings import value as setting
from kissbot.types import utcnow

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464
"""``kissbot metrics serve``'s default port (the one commonly used by exporters of this kind)."""
MAX_CHANNELS = 100
"""At most this many ``channel`` series of heartbeat age: the silent longest first."""
MAX_EVENT_TYPES = 50
"""At most this many ``event_type`` series: the most frequent first, the rest as ``other``."""
MAX_TOKEN_TYPES = 10
"""At most this many ``token_type`` label values, the rest as ``other``."""

TOKEN_STATES = ("valid", "expired", "needs_reauth")
INSTANCE_STATUSES = ("running", "stopped", "crashed", "disabled")
KNOWN_TOKEN_TYPES = ("bot", "broadcaster")

_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_OTHER = "other"


def open_engine(target: str | os.PathLike[str] | URL) -> Engine:
    """An engine on the existing store at ``target`` (SQLite path or URL), without a key.

    Raises :class:`~kissbot.errors.NoDatabase` if it does not exist and
    :class:`~kissbot.errors.OutdatedSchema` if it is not at the newest
    migration. Nothing is ever written: SQLite is read through
    ``query_only`` connections.
    """
    url = existing_store(target, ConfigurationError("an in-memory database has no metrics: pass --db PATH or --url URL"))
    path = sqlite_path(url)
    if path is None:
        engine = create_engine(url)
    else:
        # Read-only connections: a scrape never writes, not even the journal mode.
        engine = sqlalchemy.create_engine(
            url, creator=lambda: connect_sqlite_query_only(path), poolclass=NullPool, hide_parameters=True
        )
    try:
        ensure_schema(engine, create=False)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _label(value: Any) -> str:
    """``value`` as a label value if it looks like an identifier, else ``other``."""
    return value if isinstance(value, str) and _LABEL.fullmatch(value) else _OTHER


def _capped(counts: dict[str, float], limit: int) -> dict[str, float]:
    """The ``limit`` largest entries of ``counts`` (labels sanitised), the rest summed as ``other``."""
    out: Counter[str] = Counter()
    for rank, (name, value) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))):
        out[_label(name) if rank < limit else _OTHER] += value
    return dict(out)


@dataclass(frozen=True)
class _Settings:
    """The config values a scrape reads (:func:`kissbot.settings.value`: unset, their default)."""

    refresh_window: float
    health_check_interval: float
    retention_days: float
    primary_key: int

    @classmethod
    def read(cls, conn: Connection) -> _Settings:
        keys = ("token_refresh_interval", "health_check_interval", "log_retention_days", "encryption_key_version")
        return cls(*(setting(conn, key) for key in keys))

    def families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "kissbot_token_refresh_window_seconds",
            "Config token_refresh_interval: tokens expiring this soon are refreshed.",
            value=self.refresh_window,
        )
        yield GaugeMetricFamily(
            "kissbot_health_check_interval_seconds",
            f"Config health_check_interval: a running instance silent for {STALE_HEARTBEATS} times this is stale.",
            value=self.health_check_interval,
        )
        yield GaugeMetricFamily(
            "kissbot_audit_retention_seconds", "Config log_retention_days, in seconds.", value=self.retention_days * 86400
        )
        yield GaugeMetricFamily(
            "kissbot_key_primary_version", "The key version new tokens are encrypted with.", value=self.primary_key
        )


class StoreCollector(Collector):
    """Collects the store's metrics from ``engine`` on each scrape.

    ``engine`` is a store engine (:func:`open_engine`); no key is needed.
    If the store cannot be read, the scrape still answers, with
    ``kissbot_store_up 0`` and ``kissbot_build_info`` only.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_channels: int = MAX_CHANNELS,
        max_event_types: int = MAX_EVENT_TYPES,
    ) -> None:
        self.engine = engine
        self.max_channels = max_channels
        self.max_event_types = max_event_types
        self.path: Path | None = sqlite_path(engine.url)

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        try:
            with self.engine.connect() as conn:
                revision = current_revision(conn) or ""
                settings = _Settings.read(conn)
                families = [
                    *settings.families(),
                    *self._tokens(conn, now, settings),
                    *self._instances(conn, now),
                    *self._audit(conn, now, settings),
                    *self._size(conn),
                    *self._backup(),
                ]
        except (SQLAlchemyError, KissbotError, OSError) as exc:
            log.warning("metrics: cannot read the store: %s", driver_message(exc))
            up, revision, families = 0, "", []
        else:
            up = 1
        info = InfoMetricFamily("kissbot_build", "kissbot's version and the store's schema revision.")
        info.add_metric([], {"version": __version__, "schema_revision": revision})
        yield info
        yield GaugeMetricFamily("kissbot_store_up", "1 if the last scrape read the store, else 0.", value=up)
        yield from families

    # --- the parts of a scrape ----------------------------------------------------------------

    def _tokens(self, conn: Connection, now: datetime, settings: _Settings) -> Iterator[Metric]:
        t = oauth_tokens.c
        usable = t.needs_reauth.is_not(True)
        # Covered by idx_oauth_state, in its order: no table row is read.
        rows = conn.execute(
            select(t.token_type, t.needs_reauth, t.key_version, func.count(), func.sum(t.refresh_failures))
            .group_by(t.token_type, t.needs_reauth, t.key_version)
        ).all()
        # idx_oauth_expires: only the tokens due within the window are read (a GROUP BY
        # token_type would make SQLite walk idx_oauth_state and every row instead).
        due = Counter(
            (kind, bool(lapsed))
            for kind, lapsed in conn.execute(
                select(t.token_type, t.expires_at <= now)
                .where(t.expires_at <= now + timedelta(seconds=settings.refresh_window), usable)
            )
        )
        soonest = conn.execute(select(t.expires_at).where(usable).order_by(t.expires_at).limit(1)).scalar()
        totals: Counter[str] = Counter()
        for row in rows:
            totals[row[0]] += row[3]
        kept = _capped(totals, MAX_TOKEN_TYPES)
        states: dict[str, Counter[str]] = defaultdict(Counter)
        expiring: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        per_key: Counter[int] = Counter()
        for kind, reauth, key_version, total, failed in rows:
            kind = _kind(kind, kept)
            states[kind]["needs_reauth" if reauth else "valid"] += total
            failures[kind] += int(failed or 0)
            per_key[int(key_version)] += total
        for (kind, lapsed), n in due.items():
            kind = _kind(kind, kept)
            expiring[kind] += n
            if lapsed:
                states[kind]["valid"] -= n
                states[kind]["expired"] += n
        kinds = sorted({*KNOWN_TOKEN_TYPES, *states})
        yield _family(
            "kissbot_tokens", "Stored tokens by token_type and state (valid, expired, needs_reauth).",
            ["token_type", "state"], {(kind, state): states[kind][state] for kind in kinds for state in TOKEN_STATES},
        )
        yield _family(
            "kissbot_tokens_expiring", "Usable tokens expiring within the refresh window (or already expired).",
            ["token_type"], {(kind,): expiring[kind] for kind in kinds},
        )
        yield _family(
            "kissbot_token_refresh_failures", "Consecutive refresh failures summed over the tokens.",
            ["token_type"], {(kind,): failures[kind] for kind in kinds},
        )
        if soonest is not None:
            yield GaugeMetricFamily(
                "kissbot_token_next_expiry_timestamp_seconds",
                "Soonest expiry of a token not needing reauth (Unix time); absent without such tokens.",
                value=soonest.timestamp(),
            )
        yield _family(
            "kissbot_token_rows", "Token rows by the key version that encrypted them.", ["key_version"],
            {(str(version),): per_key[version] for version in sorted({*per_key, settings.primary_key})},
        )

    def _instances(self, conn: Connection, now: datetime) -> Iterator[Metric]:
        i = instances.c
        rows = conn.execute(
            select(i.status, func.count(), func.coalesce(func.sum(i.crash_count), 0)).group_by(i.status)
        ).all()
        count: Counter[str] = Counter({s: 0 for s in INSTANCE_STATUSES})
        crashes: Counter[str] = Counter({s: 0 for s in INSTANCE_STATUSES})
        for status, n, crashed in rows:
            count[_label(status)] += n
            crashes[_label(status)] += crashed
        yield _family("kissbot_instances", "Bot instances by status.", ["status"], {(k,): v for k, v in sorted(count.items())})
        yield _family(
            "kissbot_instance_crashes", "Crash counts (crash_count) summed over the instances, by status.",
            ["status"], {(k,): v for k, v in sorted(crashes.items())},
        )
        beat = func.min(func.coalesce(i.last_heartbeat, i.start_time, i.created_at))
        rows = conn.execute(
            select(users.c.twitch_login, beat)
            .join(users, users.c.id == i.channel_id)
            .where(i.status == "running")
            .group_by(users.c.twitch_login)
            .order_by(beat, users.c.twitch_login)
            .limit(self.max_channels)
        ).all()
        ages: dict[str, float] = {}
        for login, last in rows:
            last = _aware(last)
            if last is not None:
                ages[_label(login)] = max(ages.get(_label(login), 0.0), (now - last).total_seconds(), 0.0)
        yield _family(
            "kissbot_instance_heartbeat_age_seconds",
            f"Seconds since the last heartbeat of each channel's running instance (oldest first, at most "
            f"{self.max_channels} channels).",
            ["channel"], {(login,): age for login, age in sorted(ages.items())},
        )

    def _audit(self, conn: Connection, now: datetime, settings: _Settings) -> Iterator[Metric]:
        a = audit_log.c
        cutoff = now - timedelta(days=settings.retention_days)
        # idx_audit_event_type counts every row; rows older than the window
        # (cleanup-logs not run yet) are counted apart, by idx_audit_timestamp, and taken off.
        totals = dict(conn.execute(select(a.event_type, func.count()).group_by(a.event_type)).all())
        oldest = conn.execute(select(func.min(a.timestamp))).scalar()
        if oldest is not None and _aware(oldest) < cutoff:
            old = conn.execute(select(a.event_type, func.count()).where(a.timestamp < cutoff).group_by(a.event_type))
            for event_type, n in old:
                totals[event_type] -= n
        counts = _capped({k: v for k, v in totals.items() if v}, self.max_event_types)
        yield _family(
            "kissbot_audit_events", "Audit events in the retention window, by event_type.", ["event_type"],
            {(k,): v for k, v in sorted(counts.items())},
        )

    def _size(self, conn: Connection) -> Iterator[Metric]:
        if self.engine.dialect.name == "postgresql":
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            yield GaugeMetricFamily("kissbot_database_size_bytes", "Size of the database.", value=size)
            return
        assert self.path is not None
        yield GaugeMetricFamily("kissbot_database_size_bytes", "Size of the database file.", value=self.path.stat().st_size)
        wal = Path(f"{self.path}-wal")
        yield GaugeMetricFamily(
            "kissbot_database_wal_size_bytes", "Size of the SQLite write-ahead log (-wal file).",
            value=wal.stat().st_size if wal.exists() else 0,
        )

    def _backup(self) -> Iterator[Metric]:
        if self.path is None:
            return
        pattern = re.compile(re.escape(self.path.name) + r"\.backup_\d{8}_\d{6}(?:_\d+)?")
        times = [
            entry.stat().st_mtime
            for entry in os.scandir(self.path.parent)
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
        ]
        if times:
            yield GaugeMetricFamily(
                "kissbot_last_backup_timestamp_seconds",
                "When the newest `kissbot backup` beside the database was written (Unix time).",
                value=max(times),
            )


def _family(name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def _aware(value: datetime | str | None) -> datetime | None:
    """An aggregate's timestamp as aware UTC (on SQLite, MIN() returns the stored text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)


def _kind(token_type: Any, kept: dict[str, float]) -> str:
    label = _label(token_type)
    return label if label in kept else _OTHER


def store_registry(engine: Engine, **options: Any) -> CollectorRegistry:
    """A new registry holding a :class:`StoreCollector` on ``engine`` (options as its)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(engine, **options))
    return registry


def render(registry: CollectorRegistry) -> str:
    """The registry's metrics in Prometheus's text format (what ``kissbot metrics`` prints)."""
    return generate_latest(registry).decode("utf-8")


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> Any:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread; return the server.

    ``port`` 0 picks a free port (``server.server_port``). Stop it with
    ``server.shutdown()``.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


# --- the refresh worker's own metrics ------------------------------------------------------------

_OUTCOMES = {
    "refreshed": ("refreshes", "refreshed"),
    "reauth": ("refreshes", "reauth"),
    "failed": ("refreshes", "failed"),
    "stale": ("refreshes", "stale"),
    "validated": ("validations", "validated"),
    "validation_failed": ("validations", "failed"),
    "skipped_locked": ("skips", "locked"),
    "skipped_fresh": ("skips", "fresh"),
    "backing_off": ("skips", "backing_off"),
}
"""Each :class:`kissbot.refresh.Outcome` value: the counter it adds to, and its label."""
TWITCH_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RefreshMetrics:
    """The refresh worker's counters and Twitch latency histogram, in a registry of their own.

    Give it to a worker, ``TokenRefresher(…, observer=metrics)``, and serve
    :attr:`registry` (``kissbot refresh-worker --metrics-port``). Twitch
    requests are timed from sending to the answer's headers: ``POST`` to the
    token endpoint is ``endpoint="token"``, ``GET`` to ``/validate`` is
    ``endpoint="validate"``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refreshes = CounterMetric(
            "kissbot_refresh_worker_refreshes", "Token refreshes by outcome: refreshed, reauth (marked for reauth), "
            "failed (transient, retried after a backoff), stale (a newer write won).",
            ["outcome"], registry=self.registry,
        )
        self.validations = CounterMetric(
            "kissbot_refresh_worker_validations", "Token validations by outcome: validated, failed (Twitch not reached "
            "or answered neither 200 nor 401; a 401 leads to a refresh).",
            ["outcome"], registry=self.registry,
        )
        self.skips = CounterMetric(
            "kissbot_refresh_worker_skips", "Due tokens left alone: locked (another worker's lease), fresh (done "
            "meanwhile), backing_off (waiting after a failure).",
            ["reason"], registry=self.registry,
        )
        self.backoffs = CounterMetric(
            "kissbot_refresh_worker_backoffs", "Backoffs started: transient refresh failures.", registry=self.registry
        )
        self.twitch = Histogram(
            "kissbot_refresh_worker_twitch_request_duration_seconds",
            "Time from sending a request to Twitch to its answer's headers, by endpoint (token, validate).",
            ["endpoint"], buckets=TWITCH_BUCKETS, registry=self.registry,
        )
        for family, label in _OUTCOMES.values():
            getattr(self, family).labels(label)
        for endpoint in ("token", "validate"):
            self.twitch.labels(endpoint)
        self._sent: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def outcome(self, outcome: Any) -> None:
        """Count one :class:`kissbot.refresh.Outcome`."""
        family, label = _OUTCOMES[outcome.value]
        getattr(self, family).labels(label).inc()
        if outcome.value == "failed":
            self.backoffs.inc()

    def instrument(self, http: Any) -> None:
        """Time every request of the :class:`httpx.Client` ``http``."""
        http.event_hooks["request"].append(self._sending)
        http.event_hooks["response"].append(self._answered)

    def _sending(self, request: Any) -> None:
        self._sent[request] = time.perf_counter()

    def _answered(self, response: Any) -> None:
        sent = self._sent.pop(response.request, None)
        if sent is not None:
            endpoint = "token" if response.request.method == "POST" else "validate"
            self.twitch.labels(endpoint).observe(time.perf_counter() - sent)
