"""Benchmark cases of a fleet's store (issue 17): ``listing``, ``fleet`` and ``plans``.

- ``listing``: ``kissbot tokens --json`` (no decryption) and ``kissbot tokens
  --reveal --json`` over ``list_rows`` tokens, a whole process (CPU time, the
  ratio's measure on a shared machine; wall time; peak RSS), against a raw
  process doing the same (driver + ``json``, + Fernet for ``--reveal``), on
  SQLite and PostgreSQL.
- ``fleet``: private memory (USS, ``/proc/<pid>/smaps_rollup``) of a bot forked
  by a supervisor that opened the store and called ``kissbot.preload()``,
  against a bot started on its own; each bot reads, stores and audits once.
- ``plans``: the plans of the due scan, due claim and a cleanup batch on
  ``scan_rows`` rows (SQLite and PostgreSQL), and on PostgreSQL the batched
  cleanup of ``pg_cleanup_rows`` and ten times as many old events, and of as
  many sharing one timestamp.

PostgreSQL rows run when ``KISSBOT_BENCH_POSTGRES_URL`` (or
``KISSBOT_TEST_POSTGRES_URL``) names a server; each uses a fresh schema.
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import make_url

from benchmarks import raw
from benchmarks.cases import Context, Row, fernet_of, open_store

LISTING = (
    "SELECT t.user_id, u.twitch_login, t.token_type, t.status, t.scopes, t.expires_at, t.needs_reauth, "
    "t.refresh_failures, t.updated_at{values} "
    "FROM oauth_tokens t JOIN users u ON u.id = t.user_id ORDER BY u.twitch_login, t.token_type"
)
FLOOR = """
import json, sys
target, key, sql, reveal = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "reveal"
if reveal:
    from cryptography.fernet import Fernet
    fernet = Fernet(open(key, "rb").read().strip())
if target.startswith("postgresql"):
    import psycopg
    conn = psycopg.connect(target)
else:
    import sqlite3
    conn = sqlite3.connect(target)
rows = []
for user_id, login, kind, status, scopes, expires, reauth, failures, updated, *values in conn.execute(sql):
    row = {"user_id": user_id, "twitch_login": login, "token_type": kind, "status": status,
           "scopes": json.loads(scopes or "[]"), "expires_at": str(expires), "needs_reauth": bool(reauth),
           "refresh_failures": failures or 0, "updated_at": str(updated), "expired": False}
    if reveal:
        row.update(access_token=fernet.decrypt(values[0].encode()).decode(),
                   refresh_token=fernet.decrypt(values[1].encode()).decode(), decrypt_error=False)
    rows.append(row)
json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
"""
"""The raw floor of a listing: the driver, ``json`` and, with ``reveal``, Fernet (the rows built in a list)."""


def postgres_url() -> str | None:
    """The PostgreSQL server of the benchmarks, if any."""
    return os.environ.get("KISSBOT_BENCH_POSTGRES_URL") or os.environ.get("KISSBOT_TEST_POSTGRES_URL")


@contextmanager
def pg_schema(base: str) -> Iterator[str]:
    """The URL of a fresh schema on ``base``'s server, dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


PEAK = """
import atexit, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(f"\\npeak-rss-kb {line.split()[1]}", file=sys.stderr)
atexit.register(_peak)
"""
"""Prints the process's peak RSS at exit. Not ``ru_maxrss``: Linux counts in it the RSS of the parent at fork."""
KISSBOT = PEAK + "from kissbot.cli import cli\ncli(prog_name='kissbot')\n"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(script: str, *args: str) -> tuple[float, float, float]:
    """Run ``python -c script args`` (stdout discarded); return its CPU seconds, wall seconds and peak RSS in MB."""
    before, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _, error = proc.communicate(timeout=1800)
    seconds = time.perf_counter() - t0
    cpu = _children_cpu() - before
    if proc.returncode != 0 or "peak-rss-kb" not in error:
        raise RuntimeError(f"{args[:2]} failed ({proc.returncode}): {error.strip()[-500:]}")
    return cpu, seconds, int(error.rsplit("peak-rss-kb", 1)[1]) / 1024


def listing_store(ctx: Context, rows: int, due: int = 0) -> tuple[Path, Path]:
    """A SQLite store of ``rows`` users with tokens (``due`` of them due), built raw; its path and key file."""
    path, key_file = ctx.workdir / f"listing_{rows}.db", ctx.workdir / f"listing_{rows}.key"
    if not path.exists():
        open_store(path, key_file).close()
        conn = raw.connect(str(path))
        raw.bulk_users_and_tokens(conn, fernet_of(key_file), rows, due=due)
        conn.execute("ANALYZE")
        conn.close()
    return path, key_file


@contextmanager
def pg_copy_of(path: Path, key_file: Path) -> Iterator[str | None]:
    """The SQLite store at ``path`` copied into a fresh PostgreSQL schema (None without a server)."""
    base = postgres_url()
    if base is None:
        yield None
        return
    from kissbot.copy import copy_store
    from kissbot.crypto import TokenCipher, read_key_ring

    with pg_schema(base) as url:
        copy_store(path, url, TokenCipher(read_key_ring(key_file)))
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
        engine.dispose()
        yield url


def bench_listing(ctx: Context) -> list[Row]:
    s = ctx.sizes
    path, key_file = listing_store(ctx, s.list_rows, due=s.scan_due)
    targets = {"SQLite": (["--db", str(path)], str(path))}
    out: list[Row] = []
    with pg_copy_of(path, key_file) as url:
        if url is not None:
            targets["PostgreSQL"] = (["--url", url], url.replace("postgresql+psycopg", "postgresql"))
        else:
            ctx.notes.append("`listing`: no PostgreSQL row (set KISSBOT_BENCH_POSTGRES_URL).")
        for (backend, (store, floor_target)), reveal in itertools.product(targets.items(), (False, True)):
            command = ["tokens", "--json", *(["--reveal"] if reveal else [])]
            sql = LISTING.format(values=", t.access_token_encrypted, t.refresh_token_encrypted" if reveal else "")
            k, f = [], []
            for _ in range(max(1, min(3, s.repeats))):
                k.append(measured(KISSBOT, *command, *store, "--key-file", str(key_file)))
                f.append(measured(PEAK + FLOOR, floor_target, str(key_file), sql, "reveal" if reveal else "-"))
            median = statistics.median
            kc, kw, fc, fw = median(x[0] for x in k), median(x[1] for x in k), median(x[0] for x in f), median(x[1] for x in f)
            kr, fr = max(x[2] for x in k), max(x[2] for x in f)
            floor = "raw driver + Fernet + json" if reveal else "raw driver + json, no decryption"
            out.append(Row(
                f"`kissbot {' '.join(command)}`, {backend}, {s.list_rows:,} tokens: whole process, CPU time (wall), "
                "peak RSS",
                f"{kc:,.2f} s CPU ({kw:,.2f} s), {kr:,.0f} MB", f"{fc:,.2f} s CPU ({fw:,.2f} s), {fr:,.0f} MB ({floor})",
                kc / fc, "≤ 2x floor, peak RSS ≤ 100 MB", kc <= 2 * fc and kr <= 100,
            ))
    return out


# --- private memory of forked bots -----------------------------------------------------------------

BOTS = """
import os, sys
url, key, bots, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def uss_kb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))

def work(mgr, user_id):
    mgr.get_tokens(user_id)
    mgr.store_tokens(user_id, "a" * 30, "r" * 50, 14400)
    mgr.log_event("bot_started", user_id=user_id)

if mode == "alone":
    from kissbot import DatabaseManager
    mgr = DatabaseManager(url=url, key_file=key)
    work(mgr, 1)
    print(uss_kb())
    sys.exit(0)

import kissbot
from kissbot import DatabaseManager
mgr = DatabaseManager(url=url, key_file=key)
kissbot.preload()
read, write = os.pipe()
pids = []
for n in range(bots):
    pid = os.fork()
    if pid == 0:
        os.close(read)
        work(mgr, n + 1)
        os.write(write, f"{uss_kb()}\\n".encode())
        os._exit(0)
    pids.append(pid)
os.close(write)
with os.fdopen(read) as lines:
    print(" ".join(lines.read().split()))
for pid in pids:
    os.waitpid(pid, 0)
"""


def bench_fleet(ctx: Context) -> list[Row]:
    s = ctx.sizes
    path, key_file = listing_store(ctx, max(s.fleet_bots, 10))
    url = f"sqlite:///{path}"
    forked = subprocess.run([sys.executable, "-c", BOTS, url, str(key_file), str(s.fleet_bots), "fork"],
                            capture_output=True, text=True, timeout=600, check=True)
    forked_kb = [int(v) for v in forked.stdout.split()]
    alone_kb = []
    for _ in range(max(1, min(3, s.repeats))):
        alone = subprocess.run([sys.executable, "-c", BOTS, url, str(key_file), "1", "alone"],
                               capture_output=True, text=True, timeout=600, check=True)
        alone_kb.append(int(alone.stdout))
    f, a = statistics.median(forked_kb) / 1024, statistics.median(alone_kb) / 1024
    return [Row(
        f"private memory (USS) per bot: {s.fleet_bots} bots forked after `kissbot.preload()` vs a bot started alone",
        f"{f:,.1f} MB (max {max(forked_kb) / 1024:,.1f})", f"{a:,.1f} MB", f / a,
        "≤ 20 MB per forked bot", f <= 20,
    )]


# --- query plans and the PostgreSQL cleanup ------------------------------------------------------------


def plans(mgr: Any, call: Callable[[Any], Any], table: str) -> list[tuple[str, str]]:
    """The statements on ``table`` that ``call(connection)`` sends (rolled back), each with its plan."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(mgr.engine, "before_cursor_execute", record)
    try:
        with mgr.engine.connect() as conn:
            call(conn)
            conn.rollback()
    finally:
        event.remove(mgr.engine, "before_cursor_execute", record)
    explain = "EXPLAIN QUERY PLAN" if mgr.engine.dialect.name == "sqlite" else "EXPLAIN"
    found = []
    with mgr.engine.connect() as conn:
        for statement, parameters in sent:
            if table in statement and not statement.startswith(("BEGIN", "SAVEPOINT")):
                lines = conn.exec_driver_sql(f"{explain} {statement}", parameters).all()
                found.append((statement, "\n".join(str(line[-1]) for line in lines)))
        conn.rollback()
    return found


def full_scan(plan: str) -> bool:
    return "Seq Scan" in plan or any(line.startswith("SCAN ") for line in plan.splitlines())


def store_plans(ctx: Context, backend: str, mgr: Any) -> list[Row]:
    from kissbot.repo import AuditRepository, TokenRepository
    from kissbot.types import utcnow

    cutoff = utcnow() - timedelta(days=30)
    checks = {
        "due scan": (lambda c: TokenRepository(c).get_tokens_needing_refresh(10), "oauth_tokens", "idx_oauth_expires"),
        "due claim": (lambda c: TokenRepository(c).claim_due("bench", 60, 10), "oauth_tokens", "idx_oauth_expires"),
        "cleanup batch": (lambda c: AuditRepository(c).delete_logs_before(cutoff, 5000), "audit_log", "idx_audit_timestamp"),
    }
    rows = []
    for what, (call, table, index) in checks.items():
        found = plans(mgr, call, table)
        ok = bool(found) and not any(full_scan(p) for _, p in found) and any(index in p for _, p in found)
        ctx.notes.append(f"### {what} on {backend}\n\n" + "\n\n".join(
            f"```sql\n{statement}\n```\n\n```\n{plan}\n```" for statement, plan in found) + "\n")
        rows.append(Row(f"plan of the {what} on {backend} ({index}, no full scan)", "yes" if ok else "NO",
                        "n/a", None, f"uses {index}", ok))
    return rows


def bench_plans(ctx: Context) -> list[Row]:
    s = ctx.sizes
    path, key_file = listing_store(ctx, s.scan_rows, due=s.scan_due)
    conn = raw.connect(str(path))
    if not conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]:
        # Events a second apart: nine tenths of them 100 days old, the rest within the retention window.
        now, old = datetime.now(timezone.utc), s.scan_rows * 9 // 10
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(raw.INSERT_AUDIT, (
            ("e", None, None, None, "info", raw.sqlite_time(now - timedelta(days=100 if n < old else 0, seconds=n)))
            for n in range(s.scan_rows)
        ))
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    conn.close()
    out = []
    with open_store(path, key_file) as mgr:
        out += store_plans(ctx, "SQLite", mgr)
    with pg_copy_of(path, key_file) as url:
        if url is None:
            ctx.notes.append("`plans`: no PostgreSQL rows (set KISSBOT_BENCH_POSTGRES_URL).")
            return out
        from kissbot import DatabaseManager

        with DatabaseManager(url=url, key_file=key_file) as mgr:
            out += store_plans(ctx, "PostgreSQL", mgr)
    with pg_schema(postgres_url()) as url, DatabaseManager(url=url, key_file=key_file) as mgr:  # type: ignore[arg-type]
        times = []
        # The third run: events written together share one timestamp (a batch starts inside it).
        for n, step in ((s.pg_cleanup_rows, "1 millisecond"), (10 * s.pg_cleanup_rows, "1 millisecond"),
                        (10 * s.pg_cleanup_rows, "0 seconds")):
            with mgr.engine.connect() as c:
                c.exec_driver_sql(
                    "INSERT INTO audit_log (event_type, severity, timestamp) SELECT 'e', 'info', "
                    f"now() - interval '100 days' - g * interval '{step}' FROM generate_series(1, %(n)s) g",
                    {"n": n},
                )
                c.commit()
                c.exec_driver_sql("ANALYZE audit_log")
                c.commit()
            t0 = time.perf_counter()
            assert mgr.cleanup_old_logs(days=30) == n
            times.append(time.perf_counter() - t0)
    one, ten, shared = times
    out.append(Row(
        f"PostgreSQL batched audit cleanup: {10 * s.pg_cleanup_rows:,} vs {s.pg_cleanup_rows:,} old events (batches of 5000)",
        f"{ten:,.2f} s", f"{one:,.2f} s", ten / one, "≤ 12x time for 10x rows (was 17x)", ten <= 12 * one,
        ratio_label="x time",
    ))
    out.append(Row(
        f"PostgreSQL batched audit cleanup: {10 * s.pg_cleanup_rows:,} old events of one timestamp vs as many of "
        "distinct timestamps", f"{shared:,.2f} s", f"{ten:,.2f} s", shared / ten,
        "≤ 2x time (idx_audit_timestamp on (timestamp, id), migration 0005)", shared <= 2 * ten, ratio_label="x time",
    ))
    return out
