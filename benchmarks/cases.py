"""The benchmark cases: each measures kissbot and its raw floor in the same run.

A case takes the :class:`Sizes` and a work directory and returns table
:class:`Row` objects. Timings use ``time.perf_counter_ns``; the contenders of a
case run interleaved (kissbot, floor, seed style, kissbot, …) after a warm-up,
and each figure is the median over the repeats.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from benchmarks import raw


@dataclass
class Sizes:
    """Every size the benchmarks use; ``--quick`` and ``--smoke`` shrink them."""

    users: int = 1000
    calls: int = 2000
    repeats: int = 7
    scan_rows: int = 100_000
    scan_due: int = 100
    scan_calls: int = 200
    procs: int = 8
    proc_ops: int = 2000
    audit_rows: int = 1_000_000
    writer_pause_ms: float = 2.0
    migrate_users: int = 10_000
    rotation_rows: int = 100_000
    cold_runs: int = 9
    offsite_rows: int = 100_000
    refresh_tokens: int = 1000
    refresh_fleet: int = 10_000
    refresh_latency: float = 0.1
    list_rows: int = 100_000
    fleet_bots: int = 8
    pg_cleanup_rows: int = 20_000
    writer_procs: int = 16
    writer_ops: int = 200

    @classmethod
    def quick(cls) -> Sizes:
        return cls(users=300, calls=500, repeats=5, scan_calls=50, proc_ops=400, audit_rows=200_000,
                   migrate_users=2000, rotation_rows=20_000, cold_runs=5, offsite_rows=20_000,
                   refresh_tokens=300, refresh_fleet=2000, list_rows=20_000, fleet_bots=4, pg_cleanup_rows=5000,
                   writer_ops=100)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(users=20, calls=10, repeats=2, scan_rows=500, scan_due=10, scan_calls=3, procs=2, proc_ops=10,
                   audit_rows=2000, migrate_users=20, rotation_rows=200, cold_runs=1, offsite_rows=200,
                   refresh_tokens=20, refresh_fleet=40, refresh_latency=0.01, list_rows=200, fleet_bots=2,
                   pg_cleanup_rows=200, writer_procs=2, writer_ops=5)


@dataclass
class Row:
    """One line of the results table. Ratios are kissbot ÷ floor (time), lower is better."""

    name: str
    kissbot: str
    floor: str
    ratio: float | None
    target: str
    met: bool | None
    seed: str = ""
    speedup: float | None = None
    ratio_label: str = "x"


@dataclass
class Context:
    """What every case gets: the sizes, a scratch directory, and extra text for the results file."""

    sizes: Sizes
    workdir: Path
    notes: list[str] = field(default_factory=list)


def ns() -> int:
    return time.perf_counter_ns()


def interleaved(contenders: dict[str, Callable[[int], Any]], calls: int, repeats: int) -> dict[str, float]:
    """Median µs per call of each contender; ``fn(i)`` is called ``calls`` times per repeat.

    One warm-up round runs first; then the contenders take turns each repeat
    so drift (other load, WAL growth) hits them alike.
    """
    for fn in contenders.values():
        for i in range(min(calls, 50)):
            fn(i)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = ns()
            for i in range(calls):
                fn(i)
            samples[name].append((ns() - t0) / calls / 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def us(value: float) -> str:
    return f"{value:,.1f} µs" if value < 1000 else f"{value / 1000:,.2f} ms"


def open_store(path: Path, key_file: Path):  # -> DatabaseManager
    from kissbot import DatabaseManager

    return DatabaseManager(path, key_file)


def fernet_of(key_file: Path) -> Fernet:
    return Fernet(key_file.read_bytes().strip())


def hot_store(ctx: Context, name: str) -> tuple[Any, sqlite3.Connection, Fernet, list[int], Path]:
    """A store with ``sizes.users`` users holding tokens, a raw held connection on it, and their ids."""
    path, key_file = ctx.workdir / f"{name}.db", ctx.workdir / f"{name}.key"
    mgr = open_store(path, key_file)
    conn = raw.connect(str(path))
    fernet = fernet_of(key_file)
    ids = raw.bulk_users_and_tokens(conn, fernet, ctx.sizes.users, due=0)
    return mgr, conn, fernet, ids, path


# --- get_tokens / store_tokens -------------------------------------------------------------------


def bench_get_tokens(ctx: Context) -> list[Row]:
    from sqlalchemy.orm import Session

    from kissbot.repo import TokenRepository

    s = ctx.sizes
    mgr, conn, fernet, ids, path = hot_store(ctx, "get")
    n = len(ids)
    session = Session(mgr.engine)
    repo = TokenRepository(session)

    def round_trip(_user_id: int) -> Any:
        # The least any read through a SQLAlchemy connection costs: checkout,
        # BEGIN, one trivial statement, end of transaction, checkin.
        with mgr.engine.connect() as c:
            return c.exec_driver_sql("SELECT 1").scalar()

    target = "≤ 5x floor, ≥ 1.5x faster than seed"
    try:
        expected = raw.get_tokens(conn, fernet, ids[0])[0]
        assert repo.get_tokens(ids[0])["access_token"] == expected == mgr.get_tokens(ids[0])["access_token"]
        t = interleaved(
            {
                "repo": lambda i: repo.get_tokens(ids[i % n]),
                "mgr": lambda i: mgr.get_tokens(ids[i % n]),
                "round_trip": lambda i: round_trip(ids[i % n]),
                "floor": lambda i: raw.get_tokens(conn, fernet, ids[i % n]),
                "seed": lambda i: raw.seed_get_tokens(str(path), fernet, ids[i % n]),
            },
            s.calls,
            s.repeats,
        )
    finally:
        session.close()
        conn.close()
        mgr.close()
    return [
        Row("get_tokens: TokenRepository, warm Session", us(t["repo"]), us(t["floor"]), t["repo"] / t["floor"],
            target, t["repo"] <= 5 * t["floor"] and t["seed"] >= 1.5 * t["repo"],
            seed=us(t["seed"]), speedup=t["seed"] / t["repo"]),
        Row("get_tokens: DatabaseManager", us(t["mgr"]), us(t["floor"]), t["mgr"] / t["floor"],
            target, t["mgr"] <= 5 * t["floor"] and t["seed"] >= 1.5 * t["mgr"],
            seed=us(t["seed"]), speedup=t["seed"] / t["mgr"]),
        Row("  SQLAlchemy's least round trip (connect, `SELECT 1`, close), no tokens read", us(t["round_trip"]),
            us(t["floor"]), t["round_trip"] / t["floor"], "(what any read through SQLAlchemy costs)", None),
    ]


def bench_store_tokens(ctx: Context) -> list[Row]:
    s = ctx.sizes
    mgr, conn, fernet, ids, path = hot_store(ctx, "store")
    n = len(ids)
    access, refresh = "a" * 30, "r" * 50
    try:
        t = interleaved(
            {
                "mgr": lambda i: mgr.store_tokens(ids[i % n], access, refresh, 14400, scopes=["chat:read"]),
                "floor": lambda i: raw.store_tokens(conn, fernet, ids[i % n], access, refresh, 14400),
                "seed": lambda i: raw.seed_store_tokens(str(path), fernet, ids[i % n], access, refresh, 14400),
            },
            s.calls,
            s.repeats,
        )
        assert mgr.get_tokens(ids[0])["refresh_token"] == refresh
    finally:
        conn.close()
        mgr.close()
    return [
        Row("store_tokens + audit row: DatabaseManager", us(t["mgr"]), us(t["floor"]), t["mgr"] / t["floor"],
            "≤ 2.5x floor, faster than seed", t["mgr"] <= 2.5 * t["floor"] and t["seed"] > t["mgr"],
            seed=us(t["seed"]), speedup=t["seed"] / t["mgr"]),
    ]


# --- due-token scan -------------------------------------------------------------------------------


def bench_due_scan(ctx: Context) -> list[Row]:
    from sqlalchemy import event

    from kissbot.types import utcnow

    s = ctx.sizes
    path, key_file = ctx.workdir / "scan.db", ctx.workdir / "scan.key"
    mgr = open_store(path, key_file)
    conn = raw.connect(str(path))
    raw.bulk_users_and_tokens(conn, fernet_of(key_file), s.scan_rows, due=s.scan_due)
    conn.execute("ANALYZE")
    emitted: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        emitted.append((statement, parameters))

    try:
        event.listen(mgr.engine, "before_cursor_execute", capture)
        due = mgr.get_tokens_needing_refresh(10)
        event.remove(mgr.engine, "before_cursor_execute", capture)
        statement, parameters = next((st, p) for st, p in emitted if "expires_at <=" in st)
        plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]
        floor_plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {raw.DUE_SCAN}", ("2000-01-01",))]
        assert len(due) == s.scan_due == len(raw.due_scan(conn, utcnow() + timedelta(minutes=10)))
        t = interleaved(
            {
                "mgr": lambda i: mgr.get_tokens_needing_refresh(10),
                "floor": lambda i: raw.due_scan(conn, utcnow() + timedelta(minutes=10)),
            },
            s.scan_calls,
            s.repeats,
        )
    finally:
        conn.close()
        mgr.close()
    uses_index = any("idx_oauth_expires" in line for line in plan)
    ctx.notes.append(
        "### Query plan of the due-token scan\n\n"
        f"kissbot's statement (as emitted by `get_tokens_needing_refresh`):\n\n```sql\n{statement}\n```\n\n"
        "`EXPLAIN QUERY PLAN`:\n\n```\n" + "\n".join(plan) + "\n```\n\n"
        "The raw floor's plan:\n\n```\n" + "\n".join(floor_plan) + "\n```\n"
    )
    return [
        Row(f"due-token scan: {s.scan_due} due of {s.scan_rows:,} rows (plan uses idx_oauth_expires: "
            f"{'yes' if uses_index else 'NO'})", us(t["mgr"]), us(t["floor"]), t["mgr"] / t["floor"],
            "≤ 3x floor, uses idx_oauth_expires", t["mgr"] <= 3 * t["floor"] and uses_index),
    ]


# --- many processes -------------------------------------------------------------------------------


def mixed_worker(path: str, key_file: str, ids: list[int], ops: int, seed: int, barrier: Any, results: Any) -> None:
    """One bot process: 70% get_tokens, 20% store_tokens, 10% log_event; report (ops, errors, t0, t1, first error)."""
    mgr = open_store(Path(path), Path(key_file))
    rng = random.Random(seed)
    errors, first_error = 0, ""
    barrier.wait(timeout=120)
    t0 = ns()
    for _ in range(ops):
        user_id = rng.choice(ids)
        roll = rng.random()
        try:
            if roll < 0.7:
                mgr.get_tokens(user_id)
            elif roll < 0.9:
                mgr.store_tokens(user_id, f"access-{rng.random()}", f"refresh-{rng.random()}", 14400)
            else:
                mgr.log_event("bench_event", user_id=user_id, details={"n": roll})
        except Exception as exc:  # counted and reported, never swallowed silently
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
    t1 = ns()
    mgr.close()
    results.put((ops, errors, t0, t1, first_error))


def run_workers(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[Any]:
    """Spawn one process per ``args`` running ``target(*args, barrier, results)``, start them together, return their reports."""
    mp = multiprocessing.get_context("spawn")
    barrier, results = mp.Barrier(len(args) + 1), mp.Queue()
    workers = [mp.Process(target=target, args=(*a, barrier, results)) for a in args]
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=180)
        return [results.get(timeout=600) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()


def run_processes(path: Path, key_file: Path, ids: list[int], procs: int, ops: int) -> tuple[float, int, str]:
    """Run ``procs`` mixed workers at once; return (ops per second overall, errors, first error)."""
    reports = run_workers(mixed_worker, [(str(path), str(key_file), ids, ops, n) for n in range(procs)])
    total = sum(r[0] for r in reports)
    elapsed = (max(r[3] for r in reports) - min(r[2] for r in reports)) / 1e9
    errors = sum(r[1] for r in reports)
    return total / elapsed, errors, next((r[4] for r in reports if r[4]), "")


def bench_processes(ctx: Context) -> list[Row]:
    s = ctx.sizes
    mgr, conn, __fernet, ids, path = hot_store(ctx, "procs")
    conn.close()
    mgr.close()
    key_file = ctx.workdir / "procs.key"
    one, one_errors, _ = run_processes(path, key_file, ids, 1, s.proc_ops)
    many, errors, first = run_processes(path, key_file, ids, s.procs, s.proc_ops)
    errors += one_errors
    if first:
        ctx.notes.append(f"First error in the {s.procs}-process run: `{first}`")
    return [
        Row(f"{s.procs} processes, mixed ops on one file (70% get, 20% store, 10% audit)",
            f"{many:,.0f} ops/s, {errors} errors", f"{one:,.0f} ops/s (1 process)", many / one,
            "0 errors", errors == 0, ratio_label="x throughput"),
    ]


# --- cleanup under a concurrent writer --------------------------------------------------------------


def writer_worker(
    path: str, key_file: str, user_id: int, pause_ms: float, ready: Any, stop: Any, written: Any, results: Any
) -> None:
    """Refresh one user's tokens in a loop until ``stop``, counting in ``written``; report [(start_ns, latency_ns)]."""
    mgr = open_store(Path(path), Path(key_file))
    samples: list[tuple[int, int]] = []
    ready.set()
    n = 0
    while not stop.is_set():
        t0 = ns()
        mgr.store_tokens(user_id, f"access-{n}", f"refresh-{n}", 14400)
        samples.append((t0, ns() - t0))
        n += 1
        written.value = n
        time.sleep(pause_ms / 1000)
    mgr.close()
    results.put(samples)


def with_writer(path: Path, key_file: Path, user_id: int, pause_ms: float, work: Callable[[], int]) -> tuple[float, list[int], int]:
    """Run ``work`` while another process writes; return (work seconds, writer latencies during it in ns, result)."""
    mp = multiprocessing.get_context("spawn")
    ready, stop, results, written = mp.Event(), mp.Event(), mp.Queue(), mp.Value("q", 0)
    writer = mp.Process(
        target=writer_worker, args=(str(path), str(key_file), user_id, pause_ms, ready, stop, written, results)
    )
    writer.start()
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("writer process did not start")
        time.sleep(0.3)
        before = written.value
        t0 = ns()
        result = work()
        t1 = ns()
        while written.value < before + 2 and writer.is_alive():  # so one write began after the work did
            time.sleep(0.001)
        stop.set()
        samples = results.get(timeout=120)
    finally:
        stop.set()
        writer.join(timeout=60)
        if writer.is_alive():
            writer.kill()
    during = [lat for start, lat in samples if t0 <= start <= t1]
    if not during:  # a tiny run can finish between two writes: take the write that came next
        during = [lat for start, lat in samples if start >= t0][:1]
    return (t1 - t0) / 1e9, during, result


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile (0–1) of ``values`` in ms (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] / 1e6


def bench_cleanup(ctx: Context) -> list[Row]:
    from kissbot.manager import CLEANUP_BATCH_SIZE

    s = ctx.sizes
    path, key_file = ctx.workdir / "audit.db", ctx.workdir / "audit.key"
    mgr = open_store(path, key_file)
    conn = raw.connect(str(path))
    (user_id,) = raw.bulk_users_and_tokens(conn, fernet_of(key_file), 1, due=0)
    raw.bulk_audit(conn, s.audit_rows, age=timedelta(days=100))
    mgr.close()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw_path = ctx.workdir / "audit_raw.db"
    shutil.copyfile(path, raw_path)

    def kissbot_cleanup() -> int:
        with open_store(path, key_file) as store:
            return store.cleanup_old_logs(days=30)

    def raw_cleanup() -> int:
        held = raw.connect(str(raw_path))
        try:
            return raw.cleanup_audit(held, 30, CLEANUP_BATCH_SIZE)
        finally:
            held.close()

    k_secs, k_lat, k_deleted = with_writer(path, key_file, user_id, s.writer_pause_ms, kissbot_cleanup)
    r_secs, r_lat, r_deleted = with_writer(raw_path, key_file, user_id, s.writer_pause_ms, raw_cleanup)
    assert k_deleted == r_deleted == s.audit_rows, (k_deleted, r_deleted)
    k50, k99 = (percentile(k_lat, 0.5), percentile(k_lat, 0.99)) if k_lat else (float("nan"),) * 2
    r50, r99 = (percentile(r_lat, 0.5), percentile(r_lat, 0.99)) if r_lat else (float("nan"),) * 2
    return [
        Row(f"cleanup_old_logs of {s.audit_rows:,} audit rows (batches of {CLEANUP_BATCH_SIZE}), writer running",
            f"{k_secs:,.2f} s", f"{r_secs:,.2f} s", k_secs / r_secs, "(duration, no target)", None),
        Row(f"  concurrent writer's store_tokens latency during that cleanup ({len(k_lat)} / {len(r_lat)} samples)",
            f"p50 {k50:.1f} ms, p99 {k99:.1f} ms", f"p50 {r50:.1f} ms, p99 {r99:.1f} ms",
            k99 / r99 if r_lat and k_lat else None, "p99 ≤ 250 ms", k99 <= 250 if k_lat else None,
            ratio_label="x (p99)"),
    ]


# --- migrate-yaml ---------------------------------------------------------------------------------


def invoke(args: list[str]) -> None:
    """Run the kissbot CLI in this process; raise with its output if it fails."""
    from click.testing import CliRunner

    from kissbot.cli import cli

    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"kissbot {' '.join(args)} failed ({result.exit_code}): {result.output.strip()}")


MIGRATE_ROUNDS = 3
"""Rounds of the migrate case (each migrates every user three ways); ``--smoke`` makes fewer."""


def bench_migrate_yaml(ctx: Context) -> list[Row]:
    """migrate-yaml (the CLI, in process) and ``import_tokens`` of the parsed file, each against the raw floor.

    The floor, the CLI and the pre-parsed import take turns, each on a fresh
    store, for a few rounds; the ratio is the median of the rounds' ratios, so
    a load that changes between rounds hits both sides of each ratio alike.
    """
    import yaml

    s = ctx.sizes
    entries = [
        {"login": f"Bench_User_{i}", "user_id": 500_000 + i,
         "access_token": f"access{i:06d}abcdefghijklmnopqrstu", "refresh_token": f"refresh{i:06d}abcdefghijklmnopqrstuvwxyz0123"}
        for i in range(s.migrate_users)
    ]
    rounds = min(MIGRATE_ROUNDS, s.repeats)

    def fresh(name: str) -> tuple[Path, Path]:
        path, key_file = ctx.workdir / f"{name}.db", ctx.workdir / f"{name}.key"
        for stale in (path, key_file, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            stale.unlink(missing_ok=True)
        open_store(path, key_file).close()
        return path, key_file

    def floor_run() -> float:
        path, key_file = fresh("migrate_raw")
        conn = raw.connect(str(path))
        t0 = ns()
        raw.migrate_stores(conn, fernet_of(key_file), entries)
        secs = (ns() - t0) / 1e9
        conn.close()
        return secs

    name = f"migrate-yaml of {s.migrate_users:,} users vs {s.migrate_users:,} raw stores (one transaction)"
    from kissbot.importers import import_tokens, read_yaml_tokens

    config = ctx.workdir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bot": {"prefix": "!"},
        "twitch": {"tokens": {e["login"]: {k: e[k] for k in ("user_id", "access_token", "refresh_token")} for e in entries}},
    }))
    floor, cli, parse, store = [], [], [], []
    for _ in range(rounds):
        floor.append(floor_run())
        path, key_file = fresh("migrate")
        t0 = ns()
        invoke(["migrate-yaml", str(config), "--db", str(path), "--key-file", str(key_file), "--no-backup"])
        cli.append((ns() - t0) / 1e9)
        with open_store(path, key_file) as mgr:
            assert mgr.get_stats()["tokens_count"] == s.migrate_users
        # The floor parses no YAML: the library's own part is the import of the parsed batch.
        t0 = ns()
        batch = read_yaml_tokens(config)
        parse.append((ns() - t0) / 1e9)
        path, key_file = fresh("migrate_parsed")
        t0 = ns()
        import_tokens(batch, db_path=path, key_file=key_file, backup=False)
        store.append((ns() - t0) / 1e9)
    median = statistics.median
    floor_text = f"{median(floor):,.2f} s"
    cli_ratio = median(c / f for c, f in zip(cli, floor))
    store_ratio = median(p / f for p, f in zip(store, floor))
    return [
        Row(name, f"{median(cli):,.2f} s", floor_text, cli_ratio, "≤ 4x floor", cli_ratio <= 4),
        Row(f"  same, config.yaml already parsed (`import_tokens`; parsing it took {median(parse):,.2f} s)",
            f"{median(store):,.2f} s", floor_text, store_ratio, "≤ 4x floor", store_ratio <= 4),
    ]


# --- key rotation ---------------------------------------------------------------------------------


def bench_rotation(ctx: Context) -> list[Row]:
    s = ctx.sizes
    floor_path, floor_key = ctx.workdir / "rotate_raw.db", ctx.workdir / "rotate_raw.key"
    open_store(floor_path, floor_key).close()
    conn = raw.connect(str(floor_path))
    old = fernet_of(floor_key)
    raw.bulk_users_and_tokens(conn, old, s.rotation_rows, due=0)
    t0 = ns()
    done = raw.rotate(conn, old, Fernet(Fernet.generate_key()))
    floor_secs = (ns() - t0) / 1e9
    conn.close()
    assert done == s.rotation_rows
    name = f"key rotation of {s.rotation_rows:,} token rows vs raw decrypt + encrypt"
    floor = f"{floor_secs:,.2f} s ({s.rotation_rows / floor_secs:,.0f} rows/s)"
    path, key_file = ctx.workdir / "rotate.db", ctx.workdir / "rotate.key"
    open_store(path, key_file).close()
    conn = raw.connect(str(path))
    raw.bulk_users_and_tokens(conn, fernet_of(key_file), s.rotation_rows, due=0)
    conn.close()
    t0 = ns()
    invoke(["key", "rotate", "--db", str(path), "--key-file", str(key_file)])
    secs = (ns() - t0) / 1e9
    return [Row(name, f"{secs:,.2f} s ({s.rotation_rows / secs:,.0f} rows/s)", floor, secs / floor_secs,
                "≥ 40% of raw rate (≤ 2.5x time)", secs <= 2.5 * floor_secs)]


# --- cold start -----------------------------------------------------------------------------------


def bench_cold_stats(ctx: Context) -> list[Row]:
    s = ctx.sizes
    path, key_file = ctx.workdir / "stats.db", ctx.workdir / "stats.key"
    with open_store(path, key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(uid, "access", "refresh", 14400)
    script = Path(sys.executable).with_name("kissbot")
    kissbot = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from kissbot.cli import cli; sys.exit(cli())"]
    commands = {
        "kissbot": [*kissbot, "stats", "--db", str(path), "--key-file", str(key_file)],
        "floor": [sys.executable, "-c", "import sqlalchemy"],
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("KISSBOT_")}
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(s.cold_runs + 1):  # the first round only warms the page cache
        for name, command in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = ns()
            subprocess.run(command, check=True, capture_output=True, env=env, timeout=120)
            wall[name].append((ns() - t0) / 1e6)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000)
    k, f = (statistics.median(cpu[n][1:]) for n in ("kissbot", "floor"))
    kw, fw = (statistics.median(wall[n][1:]) for n in ("kissbot", "floor"))
    return [
        Row(f"cold `kissbot stats` process vs `python -c \"import sqlalchemy\"`: CPU time, median of {s.cold_runs}",
            f"{k:,.0f} ms CPU ({kw:,.0f} ms wall)", f"{f:,.0f} ms CPU ({fw:,.0f} ms wall)", k / f, "≤ 1.5x", k <= 1.5 * f),
    ]


def bench_metrics(ctx: Context) -> list[Row]:
    from benchmarks.metrics_scrape import bench_metrics_scrape  # it imports this module's helpers

    return bench_metrics_scrape(ctx)


def bench_offsite(ctx: Context) -> list[Row]:
    """Off-site backup under a writer (benchmarks/offsite.py, imported here to keep cases importable alone)."""
    from benchmarks.offsite import bench_offsite as run

    return run(ctx)


def bench_refresh(ctx: Context) -> list[Row]:
    """The refresh worker against a fake Twitch (benchmarks/refresh_worker.py)."""
    from benchmarks.refresh_worker import bench_refresh_worker

    return bench_refresh_worker(ctx)


def case_of(module: str, name: str) -> Callable[[Context], list[Row]]:
    """The case ``bench_<name>`` of ``benchmarks/<module>.py``, imported when it runs (those modules import this one)."""

    def run(ctx: Context) -> list[Row]:
        return getattr(importlib.import_module(f"benchmarks.{module}"), f"bench_{name}")(ctx)

    return run


CASES: dict[str, Callable[[Context], list[Row]]] = {
    "get": bench_get_tokens,
    "store": bench_store_tokens,
    "scan": bench_due_scan,
    "procs": bench_processes,
    "cleanup": bench_cleanup,
    "migrate": bench_migrate_yaml,
    "rotation": bench_rotation,
    "cold": bench_cold_stats,
    "metrics": bench_metrics,
    "offsite": bench_offsite,
    "refresh": bench_refresh,
    "listing": case_of("fleet", "listing"),
    "fleet": case_of("fleet", "fleet"),
    "plans": case_of("fleet", "plans"),
    "open": case_of("store_scale", "open"),
    "writers": case_of("store_scale", "writers"),
    "pg": case_of("store_scale", "pg_get"),
}
