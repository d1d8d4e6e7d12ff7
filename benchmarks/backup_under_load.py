"""How long `backup_sqlite` and `restore_sqlite` take, and what a backup costs a bot writing meanwhile.

    python benchmarks/backup_under_load.py [--users 2000] [--events 200000]

Builds a store of that size in a temporary folder, starts a writer process
(store_tokens in a loop, recording each commit's latency), takes a backup,
stops the writer, then restores the backup. Prints wall times, the file size
and the writer's commit latencies before and during the backup.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from kissbot import DatabaseManager
from kissbot.backup import backup_sqlite, restore_sqlite
from kissbot.crypto import TokenCipher, read_key_file
from kissbot.models import audit_log
from kissbot.types import utcnow

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kissbot import DatabaseManager

    db, key, out, stop = sys.argv[1:5]
    with DatabaseManager(db, key) as mgr, open(out, "w") as fh:
        print("ready", flush=True)
        n = 0
        while not Path(stop).exists():
            t0 = time.perf_counter()
            mgr.store_tokens(1, f"a{n}", f"r{n}", 3600)
            fh.write(f"{time.time()} {time.perf_counter() - t0}\\n")
            n += 1
    """
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db, key = folder / "kissbot.db", folder / ".kissbot.key"
        with DatabaseManager(db, key) as mgr:
            with mgr.session() as s:
                from kissbot.repo import TokenRepository, UserRepository

                for i in range(args.users):
                    uid = UserRepository(s).create_user(str(i + 1), f"user{i}")
                    TokenRepository(s).store_tokens(uid, f"access{i}", f"refresh{i}", 3600)
                now = utcnow()
                rows = [{"event_type": "bench", "details": '{"n": 1}', "severity": "info", "timestamp": now}] * 10_000
                for _ in range(args.events // 10_000):
                    s.execute(audit_log.insert(), rows)
        latencies, stop = folder / "latencies", folder / "stop"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(key), str(latencies), str(stop)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(1.0)
        start = time.time()
        t0 = time.perf_counter()
        backup = backup_sqlite(db, folder / "kissbot.db.bak")
        backup_s = time.perf_counter() - t0
        end = time.time()
        time.sleep(0.5)
        stop.touch()
        proc.wait(timeout=60)
        samples = [tuple(map(float, line.split())) for line in latencies.read_text().splitlines()]
        before = [lat for at, lat in samples if at < start]
        during = [lat for at, lat in samples if start <= at <= end + max(lat for _, lat in samples)]
        t0 = time.perf_counter()
        restore_sqlite(backup, db, TokenCipher(read_key_file(key)))
        restore_s = time.perf_counter() - t0
        print(f"database {db.stat().st_size / 1e6:.1f} MB ({args.users} users with tokens, {args.events} audit events)")
        print(f"backup_sqlite: {backup_s * 1000:.0f} ms; restore_sqlite (check + backup of current + swap): {restore_s * 1000:.0f} ms")
        print(f"writer commits before backup: {len(before)}, median {statistics.median(before) * 1000:.2f} ms, "
              f"max {max(before) * 1000:.2f} ms")
        if during:
            print(f"writer commits during backup: {len(during)}, median {statistics.median(during) * 1000:.2f} ms, "
                  f"max {max(during) * 1000:.2f} ms")
        else:
            print("writer commits during backup: 0")


if __name__ == "__main__":
    main()
