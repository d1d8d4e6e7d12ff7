"""Costs that must not grow with the store or the fleet (issue 17): open, concurrent writers, PostgreSQL reads.

- ``open``: opening a store (schema check, key check) at 100 and at ``scan_rows`` tokens.
- ``writers``: ``writer_procs`` processes storing tokens for distinct users at once: the p99 latency of a
  store against the raw floor's p99 (the same processes doing BEGIN IMMEDIATE, UPDATE, audit INSERT, COMMIT).
  A note gives the CPU time of a store in each: on a machine with fewer cores than writers, the p99 follows
  it (see RESULTS.md).
- ``pg``: ``get_tokens`` through ``DatabaseManager`` on PostgreSQL against a raw psycopg read of the same row
  on a held autocommit connection. It needs a server: ``$KISSBOT_BENCH_POSTGRES_URL`` (else
  ``$KISSBOT_TEST_POSTGRES_URL``); without one the row says so.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import raw
from benchmarks.cases import Context, Row, fernet_of, interleaved, ns, open_store, percentile, run_workers, us

POSTGRES_ENV = ("KISSBOT_BENCH_POSTGRES_URL", "KISSBOT_TEST_POSTGRES_URL")


# --- open ---------------------------------------------------------------------------------------


def bench_open(ctx: Context) -> list[Row]:
    s = ctx.sizes
    stores = {}
    for name, count in (("small", 100), ("large", s.scan_rows)):
        path, key_file = ctx.workdir / f"open-{name}.db", ctx.workdir / f"open-{name}.key"
        open_store(path, key_file).close()
        conn = raw.connect(str(path))
        raw.bulk_users_and_tokens(conn, fernet_of(key_file), count, due=0)
        conn.close()
        stores[name] = (path, key_file)

    def opener(name: str) -> Any:
        path, key_file = stores[name]
        return lambda _i: open_store(path, key_file).close()

    t = interleaved({name: opener(name) for name in stores}, max(10, s.scan_calls // 4), s.repeats)
    return [
        Row(f"open a store (DatabaseManager, then close) at {s.scan_rows:,} tokens vs at 100 tokens",
            us(t["large"]), us(t["small"]) + " (100 tokens)", t["large"] / t["small"], "≤ 2x",
            t["large"] <= 2 * t["small"]),
    ]


# --- concurrent writers on one SQLite file ------------------------------------------------------------


def _writer(path: str, key_file: str, user_id: int, ops: int, kissbot: bool, barrier: Any, results: Any) -> None:
    """One process storing its own user's tokens ``ops`` times; report (latencies in ns, errors, first error, CPU ns)."""
    latencies, errors, first = [], 0, ""
    if kissbot:
        mgr = open_store(Path(path), Path(key_file))
        store = lambda n: mgr.store_tokens(user_id, f"access-{n}", f"refresh-{n}", 14400, scopes=["chat:read"])  # noqa: E731
    else:
        conn, fernet = raw.connect(path), fernet_of(Path(key_file))
        store = lambda n: raw.store_tokens(conn, fernet, user_id, f"access-{n}", f"refresh-{n}", 14400)  # noqa: E731
    store(0)  # warm-up, before the start line
    barrier.wait(timeout=120)
    cpu = time.process_time_ns()
    for n in range(ops):
        t0 = ns()
        try:
            store(n)
        except Exception as exc:  # counted and reported, never swallowed silently
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
        latencies.append(ns() - t0)
    results.put((latencies, errors, first, time.process_time_ns() - cpu))


def _writers(path: Path, key_file: Path, ids: list[int], ops: int, kissbot: bool) -> tuple[list[int], int, str, float]:
    """All latencies (ns), errors, the first error and the mean CPU µs per store of ``len(ids)`` writers."""
    reports = run_workers(_writer, [(str(path), str(key_file), uid, ops, kissbot) for uid in ids])
    latencies = [lat for r in reports for lat in r[0]]
    cpu = sum(r[3] for r in reports) / len(latencies) / 1000
    return latencies, sum(r[1] for r in reports), next((r[2] for r in reports if r[2]), ""), cpu


def bench_writers(ctx: Context) -> list[Row]:
    s = ctx.sizes
    path, key_file = ctx.workdir / "writers.db", ctx.workdir / "writers.key"
    open_store(path, key_file).close()
    conn = raw.connect(str(path))
    ids = raw.bulk_users_and_tokens(conn, fernet_of(key_file), s.writer_procs, due=0)
    conn.close()
    p99: dict[str, list[float]] = {"kissbot": [], "floor": []}
    cpu: dict[str, list[float]] = {"kissbot": [], "floor": []}
    errors, first = {"kissbot": 0, "floor": 0}, {"kissbot": "", "floor": ""}
    for _ in range(max(1, s.repeats // 2)):  # interleaved rounds, the median p99 of each
        for name in p99:
            latencies, errs, err, cpu_us = _writers(path, key_file, ids, s.writer_ops, name == "kissbot")
            p99[name].append(percentile(latencies, 0.99))
            cpu[name].append(cpu_us)
            errors[name], first[name] = errors[name] + errs, first[name] or err
    for name, err in first.items():
        if err:
            ctx.notes.append(f"First error of the {s.writer_procs} concurrent writers ({name}): `{err}`")
    k, f = statistics.median(p99["kissbot"]), statistics.median(p99["floor"])
    kc, fc = statistics.median(cpu["kissbot"]), statistics.median(cpu["floor"])
    ctx.notes.append(f"CPU time of one store with {s.writer_procs} concurrent writers: kissbot {us(kc)}, "
                     f"floor {us(fc)} ({kc / fc:.1f}x)")
    return [
        Row(f"SQLite, {s.writer_procs} processes storing tokens of distinct users: p99 of a store_tokens + audit",
            f"{k:,.2f} ms p99, {errors['kissbot']} errors", f"{f:,.2f} ms p99, {errors['floor']} errors", k / f,
            "≤ 3x floor's p99, 0 errors", k <= 3 * f and errors["kissbot"] == 0),
    ]


# --- PostgreSQL reads -----------------------------------------------------------------------------


def bench_pg_get(ctx: Context) -> list[Row]:
    name = "PostgreSQL: get_tokens through DatabaseManager vs raw psycopg (held autocommit connection, same row, decrypted)"
    url = next((os.environ[v] for v in POSTGRES_ENV if os.environ.get(v)), None)
    if url is None:
        return [Row(name, "not run", f"no server: set ${POSTGRES_ENV[0]}", None, "≤ 2x floor", None)]
    import psycopg
    import sqlalchemy
    from sqlalchemy.engine import make_url

    base = make_url(url)
    schema = f"kb_bench_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    store_url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    key_file = ctx.workdir / "pg.key"
    try:
        from kissbot import DatabaseManager

        with DatabaseManager(url=store_url, key_file=key_file) as mgr:
            ids = [mgr.create_user(str(i), f"bench_{i}") for i in range(100)]
            for uid in ids:
                mgr.store_tokens(uid, f"access-{uid}-abcdefghijklmnopqrstu", f"refresh-{uid}-abcdefghijklmnopqrst", 14400)
            fernet = fernet_of(key_file)
            dsn = store_url.set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(dsn, autocommit=True) as conn:

                def floor(i: int) -> Any:
                    row = conn.execute(raw.SELECT_TOKENS.replace("?", "%s"), (ids[i % len(ids)],)).fetchone()
                    return fernet.decrypt(row[2].encode()).decode(), fernet.decrypt(row[3].encode()).decode(), row

                assert floor(0)[0] == mgr.get_tokens(ids[0])["access_token"]
                t = interleaved({"mgr": lambda i: mgr.get_tokens(ids[i % len(ids)]), "floor": floor},
                                ctx.sizes.calls, ctx.sizes.repeats)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()
    return [Row(name, us(t["mgr"]), us(t["floor"]), t["mgr"] / t["floor"], "≤ 2x floor", t["mgr"] <= 2 * t["floor"])]
