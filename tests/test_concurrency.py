"""Many processes, one store: real processes on a real file, each run bounded in time.

The workers live in ``_workers.py`` and take a URL, so the contention, lease
and stale-writer tests run on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
from sqlalchemy import event, func, select

import _workers
from kissbot import DatabaseManager
from kissbot.crypto import generate_key
from kissbot.urls import sqlite_path, to_url
from kissbot.errors import DatabaseBusy
from kissbot.models import audit_log

SPAWN = multiprocessing.get_context("spawn")
TIMEOUT = 60  # seconds any one wait may take before the test fails instead of hanging


def _count_events(mgr: DatabaseManager, event_type: str) -> int:
    stmt = select(func.count()).select_from(audit_log).where(audit_log.c.event_type == event_type)
    with mgr.engine.connect() as conn:
        return conn.execute(stmt).scalar_one()


def _integrity(url: str) -> str:
    conn = sqlite3.connect(sqlite_path(to_url(url)))
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _run(processes: list, results=None, expected: int = 0) -> list:
    """Start ``processes``, collect ``expected`` items from ``results``, join them all (bounded)."""
    for proc in processes:
        proc.daemon = True  # never outlives the test run
        proc.start()
    received = [results.get(timeout=TIMEOUT) for _ in range(expected)]
    for proc in processes:
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in processes] == [0] * len(processes)
    return received


@pytest.fixture
def key() -> bytes:
    return generate_key()


@pytest.fixture
def store(store_url: str, key: bytes):
    """A store whose bot holds tokens: ``(url, key, manager, bot id)``."""
    with DatabaseManager(url=store_url, key=key) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, "access-0-0", "refresh-0-0", 3600)
        yield store_url, key, mgr, bot


@pytest.mark.slow
def test_eight_processes_mixing_writes_and_reads_see_no_error_and_lose_nothing(store):
    url, key, mgr, bot = store
    workers, seconds = 8, 2.0
    instance_ids = []
    for w in range(workers):
        mgr.create_user(str(100 + w), f"channel{w}")
        instance_ids.append(mgr.register_instance(f"channel{w}", "serda_bot", pid=None))
    start_at = time.time() + 2.0  # most processes are up by then; a late one still does each operation
    with ProcessPoolExecutor(workers, mp_context=SPAWN) as pool:
        futures = [
            pool.submit(_workers.contention_worker, url, key, w, bot, instance_ids[w], start_at, seconds)
            for w in range(workers)
        ]
        results = [f.result(timeout=TIMEOUT) for f in futures]

    assert [r["errors"] for r in results] == [[]] * workers
    for op in ("stores", "reads", "heartbeats", "events"):
        assert all(r[op] > 0 for r in results), (op, results)
    stores = sum(r["stores"] for r in results)
    assert _count_events(mgr, "worker_event") == sum(r["events"] for r in results)
    assert _count_events(mgr, "tokens_refreshed") == stores
    assert mgr.get_tokens(bot)["version"] == 1 + stores
    assert {i["id"] for i in mgr.get_active_instances()} == set(instance_ids)
    if url.startswith("sqlite"):
        assert _integrity(url) == "ok"


@pytest.mark.slow
def test_two_processes_claiming_one_refresh_get_exactly_one_lease(store):
    url, key, mgr, bot = store
    rounds = 8
    barrier, results = SPAWN.Barrier(2, timeout=TIMEOUT), SPAWN.Queue()
    owners = ("bot-a", "bot-b")
    procs = [
        SPAWN.Process(target=_workers.lease_worker, args=(url, key, bot, owner, rounds, barrier, results))
        for owner in owners
    ]
    received = _run(procs, results, expected=2 * rounds)
    assert results.empty()  # no "release failed"
    claims = {rnd: [] for rnd in range(rounds)}
    for rnd, owner, claimed in received:
        claims[rnd].append(claimed)
    assert all(sorted(c) == [False, True] for c in claims.values()), claims
    with mgr.session() as session:  # every holder released: a newcomer gets it
        from kissbot.repo import TokenRepository

        assert TokenRepository(session).claim_refresh(bot, "supervisor", 60)


@pytest.mark.slow
def test_a_stale_writer_is_refused_and_the_newer_refresh_token_survives(store):
    url, key, mgr, bot = store
    rounds = 5
    barrier, results = SPAWN.Barrier(2, timeout=TIMEOUT), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_workers.stale_writer_worker, args=(url, key, bot, owner, rounds, barrier, results))
        for owner in ("bot-a", "bot-b")
    ]
    received = _run(procs, results, expected=4 * rounds)
    winners = {}
    for rnd in range(rounds):
        writes = sorted((r for r in received if r[0] == rnd and r[2] != "read"), key=lambda r: r[2])
        assert [w[2] for w in writes] == ["stale", "stored"]
        winners[rnd] = writes[1][3]
        reads = [r[3] for r in received if r[0] == rnd and r[2] == "read"]
        assert reads == [winners[rnd]] * 2
    tokens = mgr.get_tokens(bot)
    assert (tokens["refresh_token"], tokens["version"]) == (winners[rounds - 1], 1 + rounds)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [5, 60])
def test_sigkill_during_writes_leaves_an_intact_store_with_the_last_commit(sqlite_url, key, kill_after):
    with DatabaseManager(url=sqlite_url, key=key) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
    receiver, sender = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(target=_workers.crash_writer, args=(sqlite_url, key, bot, sender))
    proc.start()
    sender.close()
    last = 0
    try:
        while last < kill_after:
            assert receiver.poll(TIMEOUT), "the writer stopped committing"
            last = receiver.recv()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL
    while True:  # commits reported before the kill landed
        try:
            last = receiver.recv()
        except EOFError:
            break

    assert _integrity(sqlite_url) == "ok"
    with DatabaseManager(url=sqlite_url, key=key) as mgr:
        tokens = mgr.get_tokens(bot)
        # The kill may land after a commit but before its report.
        assert tokens["refresh_token"] in (f"refresh-{last}", f"refresh-{last + 1}")
        assert tokens["version"] == int(tokens["refresh_token"].rsplit("-", 1)[1])
        mgr.store_tokens(bot, "access-after", "refresh-after", 3600)
    assert _integrity(sqlite_url) == "ok"


@pytest.mark.slow
def test_a_manager_made_before_fork_works_in_the_children_and_the_parent(store):
    url, key, mgr, bot = store
    children_users = [mgr.create_user(str(10 + i), f"child{i}") for i in range(3)]
    assert mgr.get_tokens(bot)["refresh_token"] == "refresh-0-0"  # the pool holds a connection now
    writes = 25
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_workers.forked_user, args=(mgr, uid, writes)) for uid in children_users]
    for child in children:
        child.start()
    parent_writes, deadline = 0, time.monotonic() + TIMEOUT
    while (parent_writes < writes or any(c.is_alive() for c in children)) and time.monotonic() < deadline:
        parent_writes += 1
        mgr.store_tokens(bot, f"access-p-{parent_writes}", f"refresh-p-{parent_writes}", 3600)
        mgr.log_event("parent_write")
    for child in children:
        child.join(TIMEOUT)
    assert [c.exitcode for c in children] == [0] * len(children)

    assert _count_events(mgr, "forked_write") == writes * len(children)
    assert _count_events(mgr, "parent_write") == parent_writes
    assert [mgr.get_tokens(uid)["refresh_token"] for uid in children_users] == [f"refresh-{writes - 1}"] * 3
    assert mgr.get_tokens(bot)["refresh_token"] == f"refresh-p-{parent_writes}"
    if url.startswith("sqlite"):
        assert _integrity(url) == "ok"


def test_a_lock_held_past_busy_timeout_raises_database_busy(sqlite_url, key):
    path = sqlite_path(to_url(sqlite_url))
    with DatabaseManager(url=sqlite_url, key=key, busy_timeout_ms=200) as mgr:
        mgr.log_event("before")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            t0 = time.monotonic()
            with pytest.raises(DatabaseBusy) as info:
                mgr.log_event("blocked")
            assert 0.2 <= time.monotonic() - t0 < TIMEOUT  # the writer waited its whole busy timeout
            assert mgr.get_stats()["audit_log_count"] == 1  # readers are not blocked (WAL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        mgr.log_event("after")
        assert [e["event_type"] for e in mgr.get_audit_log()] == ["after", "before"]
    assert str(info.value) == (
        f"database {path} is locked: another connection held it for more than 200 ms; check the bot processes "
        f'with `ps aux | grep "main.py\\|supervisor"` and force a WAL checkpoint with '
        f'`sqlite3 {path} "PRAGMA wal_checkpoint(RESTART);"`'
    )
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)


def test_batched_audit_cleanup_reads_a_range_of_the_timestamp_index(sqlite_url, key):
    from datetime import timedelta

    from kissbot.models import AuditLog
    from kissbot.types import utcnow

    with DatabaseManager(url=sqlite_url, key=key) as mgr:
        with mgr.session() as s:
            s.add_all(AuditLog(event_type="old", timestamp=utcnow() - timedelta(days=40)) for _ in range(3))
        deletes = []

        @event.listens_for(mgr.engine, "before_cursor_execute")
        def _capture(_conn, _cursor, statement, parameters, *_):
            if statement.startswith("DELETE FROM audit_log"):
                deletes.append((statement, parameters))

        assert mgr.cleanup_old_logs(days=30) == 3
        statement, parameters = deletes[0]
        with mgr.engine.connect() as conn:
            plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
    assert "SEARCH audit_log USING COVERING INDEX idx_audit_timestamp (timestamp<?)" in plan
    assert not [step for step in plan if step.startswith("SCAN")], plan


@pytest.mark.slow
def test_two_processes_storing_a_users_first_tokens_at_once(store):
    """Plain stores both land (one insert, one update); with expected_version=0 one is refused."""
    url, key, mgr, _ = store
    users = [(mgr.create_user(str(500 + i), f"newcomer{i}"), i % 2 == 1) for i in range(8)]
    barrier, results = SPAWN.Barrier(2, timeout=TIMEOUT), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_workers.first_store_worker, args=(url, key, users, owner, barrier, results))
        for owner in ("bot-a", "bot-b")
    ]
    received = _run(procs, results, expected=2 * len(users))
    for uid, compare_and_set in users:
        outcomes = sorted(r[2] for r in received if r[0] == uid)
        assert outcomes == (["stale", "stored"] if compare_and_set else ["stored", "stored"])
        tokens = mgr.get_tokens(uid)
        assert tokens["version"] == (1 if compare_and_set else 2)
        if compare_and_set:
            (winner,) = [r[1] for r in received if r[0] == uid and r[2] == "stored"]
            assert tokens["refresh_token"] == f"refresh-{winner}"


@pytest.mark.slow
def test_writers_waiting_for_a_lock_holder_killed_with_sigkill_all_go_on(sqlite_url, key):
    with DatabaseManager(url=sqlite_url, key=key) as mgr:
        users = [mgr.create_user(str(i), f"user{i}") for i in range(1, 5)]
    holding, started, results = SPAWN.Event(), SPAWN.Semaphore(0), SPAWN.Queue()
    holder = SPAWN.Process(target=_workers.lock_holder, args=(str(sqlite_path(to_url(sqlite_url))), holding), daemon=True)
    holder.start()
    try:
        assert holding.wait(TIMEOUT)
        writers = [SPAWN.Process(target=_workers.waiting_writer, args=(sqlite_url, key, uid, 30_000, started, results),
                                 daemon=True) for uid in users]
        for writer in writers:
            writer.start()
        for _ in writers:
            assert started.acquire(timeout=TIMEOUT)
        time.sleep(0.5)  # the writers are waiting for the lock now
        assert results.empty()
        killed_at = time.monotonic()  # the system-wide monotonic clock, as the writers read it
        os.kill(holder.pid, signal.SIGKILL)
        reports = sorted(results.get(timeout=TIMEOUT) for _ in writers)
    finally:
        holder.kill()
        holder.join(TIMEOUT)
    for writer in writers:
        writer.join(TIMEOUT)
    assert [w.exitcode for w in writers] == [0] * len(writers)
    assert [(uid, error) for uid, _done, error in reports] == [(uid, None) for uid in users]
    assert all(done > killed_at for _uid, done, _error in reports)  # each waited for the lock until the kill
    with DatabaseManager(url=sqlite_url, key=key) as mgr:
        assert [mgr.get_tokens(uid)["refresh_token"] for uid in users] == [f"refresh-{uid}" for uid in users]
    assert _integrity(sqlite_url) == "ok"
