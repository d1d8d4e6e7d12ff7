"""The refresh worker against kissbot's fake Twitch answering each request after ``--refresh-latency`` seconds.

The fake runs in its own process (so it does not share the worker's interpreter
lock) and counts the refreshes of each refresh token, so a token refreshed
twice shows. Rows (``python -m benchmarks --only refresh``), on SQLite and, when
``KISSBOT_BENCH_POSTGRES_URL`` names a server, on PostgreSQL:

* one process refreshing N due tokens at the default concurrency, against the
  bound N × latency ÷ concurrency (target ≤ 1.5x), and its tokens/s against
  the sequential worker's (``--concurrency 1`` on a sample; target ≥ 10x);
* 2 and 4 ``kissbot refresh-worker --once`` processes over the same due
  tokens: no token refreshed twice, total throughput ≥ one such process's;
* the fleet: 10,000 due tokens by one process (target ≤ 60 s).

Run alone: ``python -m benchmarks.refresh_worker`` (prints the rows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.cases import Context, Row, Sizes

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"
PG_ENV = "KISSBOT_BENCH_POSTGRES_URL"
KISSBOT = [sys.executable, "-c", "from kissbot.cli import cli; cli()"]
FAKE = (
    "import json, sys\n"
    "from kissbot.fake_twitch import FakeTwitch\n"
    "twitch = FakeTwitch(sys.argv[1], sys.argv[2], latency=float(sys.argv[3]), accept_unknown=True)\n"
    "print(twitch.base_url, flush=True)\n"
    "for line in sys.stdin:\n"
    "    counts = twitch.refreshes_per_token()\n"
    "    print(json.dumps([len(counts), sum(counts.values()), sum(1 for c in counts.values() if c > 1)]), flush=True)\n"
    "    with twitch.lock:\n"
    "        twitch.token_forms.clear()\n"
)


class FakeTwitchProcess:
    """kissbot's fake Twitch in a child process: ``counts()`` = (tokens refreshed, refreshes, tokens refreshed twice)."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAKE, CLIENT_ID, CLIENT_SECRET, str(latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        base = self.proc.stdout.readline().strip()
        self.token_url, self.validate_url = f"{base}/oauth2/token", f"{base}/oauth2/validate"

    def counts(self) -> tuple[int, int, int]:
        """The refreshes since the last call (and forget them)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        tokens, refreshes, twice = json.loads(self.proc.stdout.readline())
        return tokens, refreshes, twice

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@contextmanager
def due_store(backend: str, base: str, tokens: int) -> Iterator[tuple[str, Path]]:
    """A fresh store (its URL and key file) holding ``tokens`` users whose tokens expire in 30 s."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from kissbot import DatabaseManager
    from kissbot.repo import TokenRepository, UserRepository

    name = uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory(prefix="kissbot-refresh-") as tmp:
        key = Path(tmp) / "bench.key"
        admin = None
        if backend == "postgresql":
            schema = f"bench_{name}"
            admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
        else:
            url = base % name
        try:
            with DatabaseManager(url=url, key_file=key) as mgr, mgr.session() as s:
                ids = UserRepository(s).create_users(
                    [{"twitch_user_id": str(10**6 + i), "twitch_login": f"bench_{i}", "is_bot": True} for i in range(tokens)]
                )
                TokenRepository(s).store_many_tokens(
                    [(uid, f"access-{uid}-{name}", f"refresh-{uid}-{name}", None) for uid in ids.values()], 30
                )
            yield url, key
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
                admin.dispose()
            elif os.path.exists(url.removeprefix("sqlite:///")):
                for suffix in ("", "-wal", "-shm"):
                    Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)


def in_process(url: str, key: Path, twitch: FakeTwitchProcess, concurrency: int | None) -> tuple[float, int]:
    """Seconds one ``refresh_due`` pass takes in this process, and how many tokens it refreshed."""
    from kissbot import DatabaseManager
    from kissbot.refresh import Outcome, TokenRefresher

    extra = {} if concurrency is None else {"concurrency": concurrency}
    with DatabaseManager(url=url, key_file=key, create=False) as mgr, TokenRefresher(
        mgr, CLIENT_ID, CLIENT_SECRET, token_url=twitch.token_url, validate_url=twitch.validate_url, **extra
    ) as worker:
        t0 = time.perf_counter()
        results = worker.refresh_due()
        elapsed = time.perf_counter() - t0
    return elapsed, sum(r.outcome is Outcome.REFRESHED for r in results)


def processes(url: str, key: Path, twitch: FakeTwitchProcess, count: int) -> float:
    """Seconds ``count`` ``kissbot refresh-worker --once`` processes take together over the store's due tokens."""
    env = {**os.environ, "TWITCH_CLIENT_ID": CLIENT_ID, "TWITCH_CLIENT_SECRET": CLIENT_SECRET,
           "KISSBOT_TWITCH_TOKEN_URL": twitch.token_url, "KISSBOT_TWITCH_VALIDATE_URL": twitch.validate_url}
    args = [*KISSBOT, "refresh-worker", "--once", "--validate-interval", "1e9", "--url", url, "--key-file", str(key)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(count)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-2000:]
    return time.perf_counter() - t0


def bench_refresh_worker(ctx: Context) -> list[Row]:
    from kissbot.refresh import DEFAULT_CONCURRENCY

    s = ctx.sizes
    n, latency, c = s.refresh_tokens, s.refresh_latency, DEFAULT_CONCURRENCY
    sample = max(1, min(n, round(5 / latency)))  # ~5 s of the sequential worker
    rows: list[Row] = []
    twitch = FakeTwitchProcess(latency)
    try:
        for backend, base in _backends(ctx.workdir):
            with due_store(backend, base, sample) as (url, key):
                seq_time, seq_done = in_process(url, key, twitch, concurrency=1)
            twitch.counts()
            seq_rate = seq_done / seq_time
            with due_store(backend, base, n) as (url, key):
                elapsed, done = in_process(url, key, twitch, concurrency=None)
            tokens, refreshes, twice = twitch.counts()
            bound = n * latency / c
            rate = done / elapsed
            ok = done == tokens == refreshes == n and twice == 0
            rows.append(Row(
                f"refresh worker ({backend}): {n:,} due tokens, one process, concurrency {c}, Twitch at {latency * 1000:.0f} ms",
                f"{elapsed:.2f} s ({rate:,.0f} tokens/s, {twice} refreshed twice)", f"{bound:.2f} s (N × latency ÷ concurrency)",
                elapsed / bound, "≤ 1.5x, each token once", elapsed <= 1.5 * bound and ok,
            ))
            rows.append(Row(
                f"refresh worker ({backend}): tokens/s vs the sequential worker (concurrency 1, {sample} tokens)",
                f"{rate:,.0f} tokens/s", f"{seq_rate:,.1f} tokens/s", rate / seq_rate, "≥ 10x", rate >= 10 * seq_rate,
                ratio_label="x faster",
            ))
            one = None
            for count in (1, 2, 4):
                with due_store(backend, base, n) as (url, key):
                    elapsed = processes(url, key, twitch, count)
                tokens, refreshes, twice = twitch.counts()
                throughput = tokens / elapsed
                if one is None:
                    one = throughput
                    continue
                rows.append(Row(
                    f"refresh worker ({backend}): {count} `refresh-worker --once` processes over {n:,} due tokens",
                    f"{throughput:,.0f} tokens/s, {refreshes - tokens} double refreshes, {n - tokens} missed",
                    f"{one:,.0f} tokens/s (one process)", throughput / one, "≥ 1x, 0 double refreshes",
                    throughput >= one and refreshes == tokens == n, ratio_label="x throughput",
                ))
        fleet = s.refresh_fleet
        with due_store("sqlite", f"sqlite:///{ctx.workdir}/refresh-%s.db", fleet) as (url, key):
            elapsed, done = in_process(url, key, twitch, concurrency=None)
        tokens, refreshes, twice = twitch.counts()
        bound = fleet * latency / c
        rows.append(Row(
            f"refresh worker (sqlite): the fleet, {fleet:,} due tokens, one process, Twitch at {latency * 1000:.0f} ms",
            f"{elapsed:.1f} s ({done / elapsed:,.0f} tokens/s, {twice} refreshed twice)",
            f"{bound:.1f} s (N × latency ÷ concurrency)", elapsed / bound, "≤ 60 s",
            elapsed <= 60 * fleet / 10_000 and done == refreshes == fleet,
        ))
    finally:
        twitch.close()
    return rows


def _backends(workdir: Path) -> list[tuple[str, str]]:
    found = [("sqlite", f"sqlite:///{workdir}/refresh-%s.db")]
    if os.environ.get(PG_ENV):
        found.append(("postgresql", os.environ[PG_ENV]))
    return found


def main() -> None:
    from benchmarks.run import table

    with tempfile.TemporaryDirectory(prefix="kissbot-bench-") as tmp:
        print(table(bench_refresh_worker(Context(Sizes(), Path(tmp)))))


if __name__ == "__main__":
    main()
