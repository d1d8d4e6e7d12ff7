"""The benchmark entry point still runs: tiny sizes, every row present with figures (no timing asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROWS = (
    "get_tokens: TokenRepository",
    "get_tokens: DatabaseManager",
    "SQLAlchemy's least round trip",
    "store_tokens + audit row",
    "due-token scan",
    "processes, mixed ops",
    "cleanup_old_logs of",
    "concurrent writer's store_tokens latency",
    "migrate-yaml of",
    "key rotation of",
    "cold `kissbot stats` process",
    "metrics scrape of",
    "backup --to of a",
    "a bot's store_tokens latency during that backup",
    "due tokens, one process, concurrency",
    "tokens/s vs the sequential worker",
    "2 `refresh-worker --once` processes",
    "4 `refresh-worker --once` processes",
    "the fleet,",
    "`kissbot tokens --json`, SQLite,",
    "`kissbot tokens --json --reveal`, SQLite,",
    "private memory (USS) per bot",
    "open a store (DatabaseManager, then close) at",
    "processes storing tokens of distinct users",
    *(("PostgreSQL: get_tokens through DatabaseManager",) if os.environ.get("KISSBOT_TEST_POSTGRES_URL") else ()),
)
NUMBER = re.compile(r"\d")


@pytest.mark.slow
def test_benchmarks_run_at_tiny_size_and_report_every_row(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(output), "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = output.read_text()
    for text in (result.stdout, written):
        lines = [line for line in text.splitlines() if line.startswith("| ")]
        for name in ROWS:
            (row,) = [line for line in lines if name in line]
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            kissbot, floor, ratio = cells[1], cells[2], cells[3]
            assert NUMBER.search(kissbot) and NUMBER.search(floor) and NUMBER.search(ratio), row
            if name.startswith(("get_tokens", "store_tokens", "first read")):
                assert NUMBER.search(cells[4]) and "faster" in cells[5], row
    assert "CPU" in written and "SQLAlchemy" in written and "SQLite" in written
    assert "idx_oauth_expires" in written
