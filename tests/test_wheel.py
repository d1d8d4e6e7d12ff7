"""A wheel built from the repository migrates a database with no checkout around."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_wheel_runs_init_db_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = dist.glob("kissbot-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kissbot/_alembic/env.py" in names
    assert any(n.startswith("kissbot/_alembic/versions/0001") for n in names)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, timeout=300, capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("KISSBOT_DB_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", "import sys, kissbot.cli; print(kissbot.cli.__file__, file=sys.stderr); kissbot.cli.cli()",
         "init-db", "--db", "some/dir/x.db"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(str(site)), "the installed wheel, not the checkout, must run"
    assert "✅ Database initialized successfully: some/dir/x.db" in result.stdout
    assert (elsewhere / "some" / "dir" / "x.db").exists()
