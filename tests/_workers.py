"""Code that runs in the worker processes of the concurrency tests.

Every function takes the store's URL and key (any backend: SQLite file or
PostgreSQL) so the same workers serve both; results come back as plain data
(return values, a queue or a pipe) and the parent asserts on them.
"""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import time
import traceback
from typing import Any, Callable

from kissbot import DatabaseManager
from kissbot.errors import StaleTokens
from kissbot.repo import TokenRepository

LEASE_TTL = 60.0


def open_store(url: str, key: bytes) -> DatabaseManager:
    """The store at ``url`` with the Fernet ``key`` (no key file)."""
    return DatabaseManager(url=url, key=key)


def contention_worker(
    url: str, key: bytes, worker: int, user_id: int, instance_id: int, start_at: float, seconds: float
) -> dict[str, Any]:
    """Mix store_tokens / get_tokens / heartbeat / log_event on one store from ``start_at`` for ``seconds``.

    Every process stores the same user's tokens (one hot row), and goes on
    past the deadline until it has done each operation once (a process that
    started late still takes part). Returns the
    count of each committed operation and every error met (as text); a read
    whose access and refresh tokens come from different writes is an error.
    """
    counts = {"stores": 0, "reads": 0, "heartbeats": 0, "events": 0}
    errors: list[str] = []
    rng = random.Random(worker)
    with open_store(url, key) as mgr:
        time.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + seconds
        n = 0
        while (time.monotonic() < deadline or not all(counts.values())) and len(errors) < 100:
            n += 1
            op = rng.choice(("stores", "reads", "reads", "heartbeats", "events"))
            try:
                if op == "stores":
                    mgr.store_tokens(user_id, f"access-{worker}-{n}", f"refresh-{worker}-{n}", 3600, ["chat:read"])
                elif op == "reads":
                    tokens = mgr.get_tokens(user_id)
                    if tokens is None or tokens["access_token"].split("-", 1)[1] != tokens["refresh_token"].split("-", 1)[1]:
                        raise AssertionError(f"torn read: {tokens and (tokens['access_token'], tokens['refresh_token'])}")
                elif op == "heartbeats":
                    mgr.update_instance_heartbeat(instance_id)
                else:
                    mgr.log_event("worker_event", user_id=user_id, details={"worker": worker, "n": n})
            except Exception as exc:  # every failure is reported, none stops the run
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            counts[op] += 1
    return {"worker": worker, **counts, "errors": errors[:20], "error_count": len(errors)}


def lease_worker(url: str, key: bytes, user_id: int, owner: str, rounds: int, barrier: Any, results: Any) -> None:
    """Claim ``user_id``'s refresh lease together with the other workers, ``rounds`` times.

    Each round all workers pass ``barrier``, claim at once, report
    ``(round, owner, claimed)`` on ``results``, wait for each other, and the
    holder releases the lease before the next round.
    """
    with open_store(url, key) as mgr:
        for rnd in range(rounds):
            barrier.wait()
            with mgr.session() as session:
                claimed = TokenRepository(session).claim_refresh(user_id, owner, LEASE_TTL)
            results.put((rnd, owner, claimed))
            barrier.wait()
            if claimed:
                with mgr.session() as session:
                    if not TokenRepository(session).release_refresh(user_id, owner):
                        results.put((rnd, owner, "release failed"))
            barrier.wait()


def stale_writer_worker(url: str, key: bytes, user_id: int, owner: str, rounds: int, barrier: Any, results: Any) -> None:
    """Read the tokens, then store rotated ones with ``expected_version`` at the same time as the others.

    Each round reports ``(round, owner, "stored" | "stale", refresh_token_written)``
    and then, once every worker has written, ``(round, owner, "read", stored_refresh_token)``.
    """
    with open_store(url, key) as mgr:
        for rnd in range(rounds):
            version = mgr.get_tokens(user_id)["version"]
            refresh = f"refresh-{owner}-{rnd}"
            barrier.wait()
            try:
                with mgr.session() as session:
                    TokenRepository(session).store_tokens(
                        user_id, f"access-{owner}-{rnd}", refresh, 3600, expected_version=version
                    )
                outcome = "stored"
            except StaleTokens:
                outcome = "stale"
            results.put((rnd, owner, outcome, refresh))
            barrier.wait()
            results.put((rnd, owner, "read", mgr.get_tokens(user_id)["refresh_token"]))
            barrier.wait()


def crash_writer(url: str, key: bytes, user_id: int, committed: Any) -> None:
    """Store tokens ``access-i``/``refresh-i`` for i = 1, 2, … forever, sending i on ``committed`` after each commit."""
    mgr = open_store(url, key)
    i = 0
    while True:
        i += 1
        mgr.store_tokens(user_id, f"access-{i}", f"refresh-{i}", 3600)
        committed.send(i)


def lock_holder(path: str, holding: Any) -> None:
    """Take SQLite's write lock on ``path`` with plain sqlite3, set ``holding`` and keep it until killed."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    holding.set()
    time.sleep(3600)


def waiting_writer(url: str, key: bytes, user_id: int, busy_timeout_ms: int, started: Any, results: Any) -> None:
    """Store ``user_id``'s tokens (once ``started`` is counted); report (user_id, ``time.monotonic()`` when done, error or None)."""
    with DatabaseManager(url=url, key=key, busy_timeout_ms=busy_timeout_ms) as mgr:
        started.release()
        try:
            mgr.store_tokens(user_id, f"access-{user_id}", f"refresh-{user_id}", 3600)
            error = None
        except Exception as exc:  # reported to the parent, which asserts there is none
            error = f"{type(exc).__name__}: {exc}"
        results.put((user_id, time.monotonic(), error))


def forked_user(mgr: DatabaseManager, user_id: int, writes: int) -> None:
    """In a forked child, use the parent's ``mgr``: ``writes`` token stores and audit events, each read back."""
    for i in range(writes):
        mgr.store_tokens(user_id, f"access-{i}", f"refresh-{i}", 3600)
        mgr.log_event("forked_write", user_id=user_id, details={"i": i})
        tokens = mgr.get_tokens(user_id)
        if tokens["refresh_token"] != f"refresh-{i}":
            raise AssertionError(f"child read {tokens['refresh_token']!r} after writing refresh-{i}")


def first_store_worker(url: str, key: bytes, users: list[tuple[int, bool]], owner: str, barrier: Any, results: Any) -> None:
    """Store the first tokens of each user at the same time as the other workers.

    ``users`` holds ``(user_id, compare_and_set)`` pairs; with compare-and-set
    the store expects version 0 (no row yet). Reports ``(user_id, owner,
    "stored" | "stale" | error text)`` for each.
    """
    with open_store(url, key) as mgr:
        for user_id, compare_and_set in users:
            barrier.wait()
            try:
                with mgr.session() as session:
                    TokenRepository(session).store_tokens(
                        user_id, f"access-{owner}", f"refresh-{owner}", 3600,
                        expected_version=0 if compare_and_set else None,
                    )
                outcome = "stored"
            except StaleTokens:
                outcome = "stale"
            except Exception as exc:  # reported, asserted on by the parent
                outcome = f"{type(exc).__name__}: {exc}"
            results.put((user_id, owner, outcome))


# --- claim_due: (index, errors, claimed) reports through a queue -----------------------------------


def _report(queue: Any, index: int, errors: list[str], claimed: list[tuple[int, str]]) -> None:
    queue.put((index, errors, claimed))


def claim_until_empty(url: str, key: bytes, index: int, barrier: Any, queue: Any) -> None:
    """Claim due tokens two at a time, under owner ``w<index>``, until none is left."""
    errors: list[str] = []
    claimed: list[tuple[int, str]] = []
    try:
        with open_store(url, key) as mgr:
            barrier.wait(timeout=60)
            while True:
                with mgr.session() as s:
                    rows = TokenRepository(s).claim_due(f"w{index}", ttl=3600, limit=2)
                if not rows:
                    break
                claimed.extend((r["user_id"], r["token_type"]) for r in rows)
    except Exception:
        errors.append(traceback.format_exc())
    _report(queue, index, errors, claimed)


def run_in_processes(
    worker: Callable[..., None], url: str, key: bytes, count: int = 8, timeout: float = 180, **kwargs: Any
) -> list[tuple[int, list[str], list[tuple[int, str]]]]:
    """Run ``worker`` in ``count`` fresh processes at once; return their reports by index."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(count), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, key, i, barrier, queue), kwargs=kwargs, daemon=True) for i in range(count)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [queue.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return sorted(reports)
