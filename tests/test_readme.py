"""The README's claims, checked against behaviour: its bot example runs as is in an empty directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def python_block_after(heading: str) -> str:
    section = README.split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_bot_example_runs_twice_in_an_empty_directory(tmp_path):
    code = python_block_after("## Using it from a bot") + "\nprint(tokens['access_token'], tokens['scopes'], tokens['expired'])\n"
    for _ in range(2):  # the first run creates the store and the user, the second finds them
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (0, "… ['chat:read', 'chat:edit'] False\n"), done.stderr
    assert (tmp_path / "kissbot.db").is_file() and (tmp_path / ".kissbot.key").is_file()


@pytest.mark.parametrize("style", ["%r", "{!r}"])
def test_decrypted_tokens_are_masked_in_reprs_not_in_str(tmp_path, style):
    from kissbot import DatabaseManager

    with DatabaseManager(tmp_path / "k.db", tmp_path / "k.key") as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, "yrxyuiyffxiqsbc6cpr5y7utl7xmtd", "kwgxkn1ylz67vho6yoh6q88pj26xve9m4hwwa8ztcx82bd3n1z", 60)
        token = mgr.get_tokens(uid)["access_token"]
    shown = style % (token,) if style == "%r" else style.format(token)
    assert shown == "'yrxy…'"
    assert str(token) == "yrxyuiyffxiqsbc6cpr5y7utl7xmtd"
