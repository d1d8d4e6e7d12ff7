"""`kissbot init-db` and `kissbot stats` through the real CLI."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import click
import pytest
from cryptography.fernet import Fernet
from click.testing import CliRunner

from kissbot import DatabaseManager, __version__
import kissbot.cli
from kissbot.cli import cli
from kissbot.cli.main import COMMAND_MODULES


@pytest.fixture
def runner():
    return CliRunner()


def test_init_db_reports_like_the_spec(runner, tmp_path):
    """SQLite: the spec's output, WAL line included (PostgreSQL's is below)."""
    db = tmp_path / "some" / "dir" / "x.db"
    result = runner.invoke(cli, ["init-db", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"📦 Creating database: {db}\n"
        "✅ WAL mode enabled: wal\n"
        "✅ Tables created: audit_log, config, instances, oauth_tokens, users\n"
        f"✅ Database initialized successfully: {db}\n"
    )
    again = runner.invoke(cli, ["init-db", "--db", str(db)])
    assert again.exit_code == 0
    assert again.output == (
        f"📦 Opening database: {db}\n"
        "✅ WAL mode enabled: wal\n"
        "✅ Tables up to date: audit_log, config, instances, oauth_tokens, users\n"
        f"✅ Database initialized successfully: {db}\n"
    )


def test_init_db_on_postgresql(runner, postgresql_url):
    result = runner.invoke(cli, ["init-db", "--url", postgresql_url])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("📦 Creating database: postgresql+psycopg://")
    assert "✅ Tables created: audit_log, config, instances, oauth_tokens, users\n" in result.output
    assert "WAL" not in result.output
    again = runner.invoke(cli, ["init-db", "--url", postgresql_url])
    assert again.output.startswith("📦 Opening database: postgresql+psycopg://")
    assert "✅ Tables up to date: audit_log, config, instances, oauth_tokens, users\n" in again.output


def test_stats_json_and_text(runner, store_url, tmp_path):
    key = tmp_path / "k.key"
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, "a", "r", 60)
    result = runner.invoke(cli, ["stats", "--url", store_url, "--key-file", str(key), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert (stats["users_count"], stats["tokens_count"], stats["audit_log_count"]) == (1, 1, 2)
    text = runner.invoke(cli, ["stats", "--url", store_url, "--key-file", str(key)])
    assert text.output.splitlines()[:5] == [
        "Users: 1",
        "Tokens: 1",
        "Tokens needing reauth: 0",
        "Active instances: 0",
        "Audit log entries: 2",
    ]


def test_url_from_environment(runner, store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("KISSBOT_DB_URL", store_url)
    assert runner.invoke(cli, ["init-db"]).exit_code == 0
    result = runner.invoke(cli, ["stats", "--json", "--key-file", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["users_count"] == 0
    with DatabaseManager(url=store_url, key_file=tmp_path / "k") as mgr:
        assert mgr.get_config("max_crash_count") == 3


def test_unreachable_postgresql_is_one_line_exit_1(runner, tmp_path):
    url = "postgresql+psycopg://kissbot@127.0.0.1:1/nowhere"
    (tmp_path / "k").write_bytes(Fernet.generate_key())
    (tmp_path / "k").chmod(0o600)
    for args in (["stats", "--url", url], ["copy", "--from", url, "--to", str(tmp_path / "t.db")]):
        result = runner.invoke(cli, [*args, "--key-file", str(tmp_path / "k")])
        assert result.exit_code == 1
        assert result.output.startswith("Error: cannot open database nowhere: connection failed: "), result.output
        assert result.output.count("\n") == 1, result.output


def test_unusable_database_is_one_line_exit_1_and_writes_nothing(runner, tmp_path):
    """SQLite only: a file that is not a database must stay byte-identical."""
    not_db = tmp_path / "notes.db"
    not_db.write_bytes(b"this is not a database at all" * 100)
    before = not_db.read_bytes()
    result = runner.invoke(cli, ["stats", "--db", str(not_db), "--key-file", str(tmp_path / "k")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot open database")
    assert len(result.output.strip().splitlines()) == 1
    assert not_db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.output == f"kissbot, version {__version__}\n"


def test_python_dash_m_kissbot_is_the_kissbot_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kissbot", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"kissbot, version {__version__}\n", "")


def _all_commands(group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))


def test_every_command_has_help_with_an_example(runner):
    commands = list(_all_commands(cli))
    assert {"init-db", "stats"} <= {path[0] for path, _ in commands}
    for path, _ in [((), cli), *commands]:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example:" in result.output, f"kissbot {' '.join(path)} --help has no example"
        assert "kissbot " in result.output.split("Example:", 1)[1], path


def test_every_command_module_is_known_to_the_group():
    """`kissbot` imports a command's module only when the command is used, from COMMAND_MODULES."""
    for module in pkgutil.iter_modules(kissbot.cli.__path__):
        importlib.import_module(f"kissbot.cli.{module.name}")
    defined = {name: command.callback.__module__ for name, command in cli.commands.items()}
    assert defined == {name: f"kissbot.cli.{module}" for name, module in COMMAND_MODULES.items()}


def test_stats_imports_no_cipher_and_no_other_command(tmp_path):
    """A cold `kissbot stats` loads only what it needs: no cipher (its key is read and checked), no other command.

    The declarative models are the schema, so the ORM is loaded (about 40 ms of import).
    """
    db, key_file = tmp_path / "k.db", tmp_path / "k.key"
    with DatabaseManager(db, key_file) as mgr:
        mgr.store_tokens(mgr.create_user("1", "serda_bot", is_bot=True), "access", "refresh", 3600)
    script = (
        "import sys\n"
        "from kissbot.cli import cli\n"
        "cli.main(['stats', '--db', sys.argv[1], '--key-file', sys.argv[2]], standalone_mode=False)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in {'alembic', 'cryptography', 'yaml', 'httpx'}\n"
        "          or m.startswith(('kissbot.cli.', 'kissbot.importers'))]\n"
        "print('loaded:', sorted(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(db), str(key_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Tokens: 1\n" in result.stdout
    assert result.stdout.splitlines()[-1] == "loaded: ['kissbot.cli.main', 'kissbot.cli.store']"
