"""The fleet recipe (issue 17 item 4): a supervisor opens the store, calls ``kissbot.preload()`` and forks its bots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kissbot import DatabaseManager

SUPERVISOR = r"""
import gc, os, sys
import kissbot
from kissbot import DatabaseManager

url, key_file, bots = sys.argv[1], sys.argv[2], int(sys.argv[3])
mgr = DatabaseManager(url=url, key_file=key_file)          # opened once, in the supervisor
ids = [mgr.get_user_by_login(f"bot_{n}")["id"] for n in range(bots)]
kissbot.preload()
pids = []
for n, user_id in enumerate(ids):
    pid = os.fork()
    if pid == 0:                                           # a bot: uses the store it inherited
        code = 1
        try:
            assert gc.get_freeze_count() > 0
            mgr.store_tokens(user_id, f"access-{n}", f"refresh-{n}", 3600)
            assert mgr.get_tokens(user_id)["access_token"] == f"access-{n}"
            mgr.log_event("bot_started", user_id=user_id)
            code = 0
        finally:
            os._exit(code)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
mgr.store_tokens(ids[0], "access-parent", "refresh-parent", 3600)  # the supervisor's own connections still work
print(codes)
"""


def test_forked_bots_read_and_write_the_store_the_supervisor_preloaded(store_url, tmp_path: Path):
    key, bots = tmp_path / "k.key", 3
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        ids = [mgr.create_user(str(100 + n), f"bot_{n}", is_bot=True) for n in range(bots)]
        mgr.store_tokens(ids[0], "first", "first", 60)
    result = subprocess.run([sys.executable, "-c", SUPERVISOR, store_url, str(key), str(bots)],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, f"{[0] * bots}\n"), result.stderr
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        assert [mgr.get_tokens(i)["refresh_token"] for i in ids] == ["refresh-parent", *(f"refresh-{n}" for n in range(1, bots))]
        assert sorted(e["user_id"] for e in mgr.get_audit_log(event_type="bot_started")) == ids


def test_preload_imports_the_bot_modules_and_freezes(tmp_path):
    script = "import gc, sys, kissbot; kissbot.preload('json'); print(gc.get_freeze_count() > 0, 'kissbot.manager' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout == "True True\n", result.stderr
