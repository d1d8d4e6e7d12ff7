"""Worker functions run in separate processes by the process tests (importable, spawn-safe).

Each takes the store's URL and key, waits on a barrier so every process starts
together, and puts ``(index, errors, claimed)`` on the queue: the tracebacks of
every failed operation and the ``(user_id, token_type)`` rows it claimed.
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Callable


def _report(queue: Any, index: int, errors: list[str], claimed: list[tuple[int, str]]) -> None:
    queue.put((index, errors, claimed))


def claim_until_empty(url: str, key: bytes, index: int, barrier: Any, queue: Any) -> None:
    """Claim due tokens two at a time, under owner ``w<index>``, until none is left."""
    from kissbot import DatabaseManager
    from kissbot.repo import TokenRepository

    errors: list[str] = []
    claimed: list[tuple[int, str]] = []
    try:
        with DatabaseManager(url=url, key=key) as mgr:
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


def mixed_operations(url: str, key: bytes, index: int, barrier: Any, queue: Any, iterations: int) -> None:
    """Store, read, heartbeat, audit and claim, ``iterations`` times, as bot ``bot_<index>``.

    Expects users ``bot_0`` … ``bot_7`` with an instance each on channel ``chan``,
    set up by the test.
    """
    from kissbot import DatabaseManager
    from kissbot.repo import TokenRepository

    errors: list[str] = []
    claimed: list[tuple[int, str]] = []
    try:
        with DatabaseManager(url=url, key=key) as mgr:
            me = mgr.get_user_by_login(f"bot_{index}")["id"]
            neighbour = mgr.get_user_by_login(f"bot_{(index + 1) % 8}")["id"]
            instance = next(i["id"] for i in mgr.get_active_instances() if i["bot_user_id"] == me)
            barrier.wait(timeout=60)
            for n in range(iterations):
                try:
                    mgr.store_tokens(me, f"access-{index}-{n}", f"refresh-{index}-{n}", 3600, scopes=["chat:read"])
                    mine = mgr.get_tokens(me)
                    if (mine["access_token"], mine["version"]) != (f"access-{index}-{n}", n + 1):
                        raise AssertionError(f"read back {mine['access_token']} v{mine['version']} after write {n}")
                    other = mgr.get_tokens(neighbour)
                    if other is not None and not other["access_token"].startswith("access-"):
                        raise AssertionError("neighbour's tokens did not decrypt to what was written")
                    mgr.update_instance_heartbeat(instance)
                    mgr.log_event("stress", user_id=me, details={"n": n})
                    with mgr.session() as s:
                        rows = TokenRepository(s).claim_due(f"w{index}", ttl=3600, limit=1)
                    claimed.extend((r["user_id"], r["token_type"]) for r in rows)
                except Exception:
                    errors.append(traceback.format_exc())
    except Exception:
        errors.append(traceback.format_exc())
    _report(queue, index, errors, claimed)


def run_in_processes(
    worker: Callable[..., None], url: str, key: bytes, count: int = 8, timeout: float = 180, **kwargs: Any
) -> list[tuple[int, list[str], list[tuple[int, str]]]]:
    """Run ``worker`` in ``count`` fresh processes at once; return their reports by index."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, key, i, barrier, queue), kwargs=kwargs) for i in range(count)]
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
