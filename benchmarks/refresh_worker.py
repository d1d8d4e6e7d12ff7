"""How long one refresh pass takes for N due tokens with K `kissbot refresh-worker --once` processes.

Uses kissbot's fake Twitch (:mod:`kissbot.fake_twitch`) on 127.0.0.1 (with ``--latency`` seconds per
token request, Twitch's own answer time) and checks each token was refreshed
exactly once.

    python benchmarks/refresh_worker.py [--tokens 200] [--workers 1 2 4] [--latency 0.05] [--url postgresql+psycopg://…]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, for the tests' fake Twitch

from kissbot import DatabaseManager  # noqa: E402
from kissbot.fake_twitch import FakeTwitch  # noqa: E402
from tests.test_refresh import CLIENT_ID, CLIENT_SECRET, WORKER, worker_env  # noqa: E402


def one_pass(url: str | None, tokens: int, workers: int, latency: float) -> float:
    twitch = FakeTwitch(CLIENT_ID, CLIENT_SECRET, latency=latency, accept_unknown=True)
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "k.key"
        schema = None
        if url:
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            target = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
        else:
            target = f"sqlite:///{tmp}/k.db"
        try:
            with DatabaseManager(url=target, key_file=key) as mgr:
                for i in range(tokens):
                    user = mgr.create_user(str(10_000 + i), f"bench_{i}", is_bot=True)
                    mgr.store_tokens(user, f"a-{i}", f"r-{i}", 30)
            args = [*WORKER, "--once", "--validate-interval", "1e9", "--url", target, "--key-file", str(key)]
            start = time.perf_counter()
            procs = [subprocess.Popen(args, env=worker_env(twitch), stdout=subprocess.PIPE) for _ in range(workers)]
            for proc in procs:
                proc.communicate(timeout=600)
                assert proc.returncode == 0
            elapsed = time.perf_counter() - start
            per_token = twitch.refreshes_per_token()
            assert len(per_token) == tokens and set(per_token.values()) == {1}, "each token refreshed once"
        finally:
            twitch.close()
            if schema:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
                admin.dispose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--latency", type=float, default=0.05, help="fake Twitch answer time (s)")
    parser.add_argument("--url", help="PostgreSQL server URL (default: a SQLite file)")
    options = parser.parse_args()
    backend = "postgresql" if options.url else "sqlite"
    for workers in options.workers:
        elapsed = one_pass(options.url, options.tokens, workers, options.latency)
        print(f"{backend}: {options.tokens} due tokens, {workers} worker(s): {elapsed:.2f}s "
              f"({options.tokens / elapsed:.0f} tokens/s), each refreshed once")


if __name__ == "__main__":
    main()
