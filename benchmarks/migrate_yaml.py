"""Time `kissbot migrate-yaml` (dry run, first run, second run) on a config with N users.

    .venv/bin/python benchmarks/migrate_yaml.py [N]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main(n: int) -> None:
    kissbot = Path(sys.executable).with_name("kissbot")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tokens = {
            f"User_{i}": {"user_id": 100000 + i, "access_token": f"oauth:{i:030d}", "refresh_token": f"{i:050d}"}
            for i in range(n)
        }
        (d / "config.yaml").write_text(yaml.safe_dump({"bot": {"name": "x"}, "twitch": {"tokens": tokens}}))
        args = [str(kissbot), "migrate-yaml", str(d / "config.yaml"), "--db", str(d / "kissbot.db"), "--key-file", str(d / "k")]
        for label, extra in (("dry run", ["--dry-run"]), ("first run", []), ("second run (with backup)", [])):
            start = time.perf_counter()
            out = subprocess.run([*args, *extra], check=True, capture_output=True, text=True).stdout
            figures = ", ".join(line for line in out.splitlines() if line.startswith("users_"))
            print(f"{label:<26} {time.perf_counter() - start:6.2f} s   {figures}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
