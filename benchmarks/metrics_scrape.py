"""Benchmark case ``metrics``: one Prometheus scrape of a large store against its raw floor.

The store holds ``scan_rows`` tokens (bot and broadcaster, some needing reauth,
some expired, two key versions) and ``audit_rows`` audit events of eight types,
all within the retention window (cleanup-logs keeps it so; rows it has not
deleted yet cost one extra indexed look-up each). kissbot's figure is a whole
scrape (:class:`kissbot.metrics.StoreCollector` through ``generate_latest``,
text included); the floor runs the same aggregate queries with plain
``sqlite3`` on one held connection.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks import raw
from benchmarks.cases import Context, Row, fernet_of, interleaved, open_store, us

EVENT_TYPES = ("tokens_refreshed", "tokens_validated", "instance_started", "instance_stopped",
               "heartbeat_missed", "user_created", "tokens_created", "refresh_failed")

FLOOR_QUERIES = (
    "SELECT version_num FROM alembic_version",
    "SELECT key, value FROM config WHERE key IN ('token_refresh_interval', 'health_check_interval', "
    "'log_retention_days', 'encryption_key_version')",
    "SELECT token_type, needs_reauth, key_version, count(*), sum(refresh_failures) FROM oauth_tokens "
    "GROUP BY token_type, needs_reauth, key_version",
    "SELECT token_type, expires_at <= :now FROM oauth_tokens WHERE expires_at <= :soon AND needs_reauth IS NOT 1",
    "SELECT expires_at FROM oauth_tokens WHERE needs_reauth IS NOT 1 ORDER BY expires_at LIMIT 1",
    "SELECT status, count(*), coalesce(sum(crash_count), 0) FROM instances GROUP BY status",
    "SELECT u.twitch_login, min(coalesce(i.last_heartbeat, i.start_time, i.created_at)) AS beat FROM instances i "
    "JOIN users u ON u.id = i.channel_id WHERE i.status = 'running' GROUP BY u.twitch_login ORDER BY beat LIMIT 100",
    "SELECT event_type, count(*) FROM audit_log GROUP BY event_type",
    "SELECT min(timestamp) FROM audit_log",
)


def build(path: Path, key_file: Path, tokens: int, audit: int) -> None:
    """A store at ``path`` with ``tokens`` token rows and ``audit`` audit rows of varied types and ages."""
    open_store(path, key_file).close()
    conn = raw.connect(str(path))
    raw.bulk_users_and_tokens(conn, fernet_of(key_file), tokens, due=tokens // 100)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE oauth_tokens SET needs_reauth = 1, status = 'expired' WHERE id % 50 = 0")
    conn.execute("UPDATE oauth_tokens SET token_type = 'broadcaster' WHERE id % 3 = 0")
    conn.execute("UPDATE oauth_tokens SET key_version = 2 WHERE id % 2 = 0")
    conn.execute("COMMIT")
    now = datetime.now(timezone.utc)
    details = json.dumps({"expires_in": 14400})
    for start in range(0, audit, 50_000):
        n = min(50_000, audit - start)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(raw.INSERT_AUDIT, (
            (EVENT_TYPES[i % len(EVENT_TYPES)], None, None, details, "info",
             raw.sqlite_time(now - timedelta(seconds=i)))
            for i in range(start, start + n)
        ))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def bench_metrics_scrape(ctx: Context) -> list[Row]:
    from kissbot.metrics import open_engine, render, store_registry

    s = ctx.sizes
    path, key_file = ctx.workdir / "metrics.db", ctx.workdir / "metrics.key"
    build(path, key_file, s.scan_rows, s.audit_rows)
    engine = open_engine(path)
    registry = store_registry(engine)
    conn = raw.connect(str(path))

    def floor(_i: int) -> None:
        now = datetime.now(timezone.utc)
        params = {"now": raw.sqlite_time(now), "soon": raw.sqlite_time(now + timedelta(seconds=60))}
        conn.execute("BEGIN")
        for query in FLOOR_QUERIES:
            conn.execute(query, params).fetchall()
        conn.execute("COMMIT")
        path.stat()
        Path(f"{path}-wal").exists()

    times = interleaved({"kissbot": lambda _i: render(registry), "floor": floor}, calls=3, repeats=s.repeats)
    engine.dispose()
    conn.close()
    k, f = times["kissbot"], times["floor"]
    return [Row(f"metrics scrape of {s.scan_rows:,} tokens and {s.audit_rows:,} audit rows",
                us(k), us(f), k / f, "≤ 100 ms", k <= 100_000)]
