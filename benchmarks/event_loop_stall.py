"""The longest event-loop stall during ``store_tokens`` while another process holds SQLite's write lock.

A 1 ms ticker runs on the event loop while a bot stores tokens; another
process holds the write lock (``BEGIN IMMEDIATE``) for ``--hold`` seconds, so
the write waits for it. Rows: :class:`kissbot.aio.AsyncTokenStore` (a worker
thread per store), the floor (the same ticker while the loop only sleeps as
long: the loop's own jitter on this machine), and the synchronous
``DatabaseManager.store_tokens`` called from a coroutine, for comparison.

    python -m benchmarks.event_loop_stall [--hold 1.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kissbot import DatabaseManager
from kissbot.aio import AsyncTokenStore

TICK = 0.001
HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE config SET value = value")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


async def _longest_stall(work: Callable[[], Awaitable[object]]) -> float:
    """Seconds of the longest gap between two 1 ms ticks beyond the tick itself, while ``work`` runs."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            longest = max(longest, time.perf_counter() - before - TICK)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # the ticker is running
    try:
        await work()
    finally:
        done.set()
        await task
    return longest


def _while_locked(db: Path, hold: float, work: Callable[[], Awaitable[object]]) -> float:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(hold)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        return asyncio.run(_longest_stall(work))
    finally:
        holder.wait(timeout=30)


def measure(hold: float, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of the longest stall (ms) for each way of writing."""
    results: dict[str, list[float]] = {"aio": [], "floor": [], "sync": []}
    with tempfile.TemporaryDirectory() as tmp:
        db, key = Path(tmp) / "stall.db", Path(tmp) / "stall.key"
        with DatabaseManager(db, key) as mgr:
            user = mgr.create_user("1", "stall_bot", is_bot=True)
            mgr.store_tokens(user, "access", "refresh", 3600)
            for _ in range(rounds):

                async def aio() -> None:
                    store = AsyncTokenStore(manager=mgr)
                    await store.store_tokens(user, "access", "refresh", 3600)
                    await store.close()

                async def floor() -> None:
                    await asyncio.sleep(hold)

                async def sync() -> None:
                    mgr.store_tokens(user, "access", "refresh", 3600)

                for name, work in (("aio", aio), ("floor", floor), ("sync", sync)):
                    results[name].append(_while_locked(db, hold, work) * 1000)
    return {name: statistics.median(values) for name, values in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=1.0, help="seconds the other process holds the write lock")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    ms = measure(args.hold, args.rounds)
    print("| case | kissbot | floor | ratio | synchronous store_tokens |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| longest event-loop stall (1 ms ticker) during store_tokens, write lock held {args.hold:g} s "
        f"by another process | {ms['aio']:.1f} ms | {ms['floor']:.1f} ms | {ms['aio'] / max(ms['floor'], 0.01):.1f}x "
        f"| {ms['sync']:.0f} ms |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
