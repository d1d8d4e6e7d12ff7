"""Time opening a store (key check) and `kissbot key rotate` on N token rows, and a key-file cipher's encrypt.

    .venv/bin/python benchmarks/key_rotation.py [N] [BATCH]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from kissbot import DatabaseManager
from kissbot.crypto import KeyFileCipher, TokenCipher
from kissbot.repo import TokenRepository, UserRepository


def main(n: int, batch: int) -> None:
    kissbot = Path(sys.executable).with_name("kissbot")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        db, key = d / "kissbot.db", d / ".kissbot.key"
        with DatabaseManager(db, key) as mgr, mgr.session() as s:
            for i in range(n):
                uid = UserRepository(s).create_user(str(i), f"user{i}")
                TokenRepository(s).store_tokens(uid, f"access-{i:030d}", f"refresh-{i:050d}", 3600)
        start = time.perf_counter()
        for _ in range(20):
            DatabaseManager(db, key).close()
        print(f"open (key check)           {(time.perf_counter() - start) / 20 * 1000:7.2f} ms")
        start = time.perf_counter()
        subprocess.run([str(kissbot), "key", "rotate", "--db", str(db), "--key-file", str(key), "--batch-size", str(batch)],
                       check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        print(f"key rotate ({n} rows, batch {batch}) {elapsed:6.2f} s   {n / elapsed:8.0f} rows/s (incl. start-up)")
        following = KeyFileCipher(key)
        plain = TokenCipher(following.ring)
        for label, cipher in (("encrypt, key-file cipher", following), ("encrypt, plain cipher", plain)):
            per = timeit.timeit(lambda: cipher.encrypt("x" * 30), number=20000) / 20000
            print(f"{label:<26} {per * 1e6:7.2f} µs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, int(sys.argv[2]) if len(sys.argv) > 2 else 500)
