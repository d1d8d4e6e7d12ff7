"""Where a store is (`--url`, `--db`, `url=`) and what a database failure looks like: one line, no password, typed."""

from __future__ import annotations

import threading

import click
import pytest
import sqlalchemy
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.errors import ConfigurationError, DatabaseBusy, DatabaseUnavailable

TYPO = "postgresql+psycopg:/kb:S3CRETPW@127.0.0.1:5432/kbx"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (TYPO, "Error: malformed database URL 'postgresql+psycopg:/kb:***@127.0.0.1:5432/kbx': expected BACKEND://…, "
               "e.g. postgresql+psycopg://user@host/db (a SQLite file is given with --db PATH)\n"),
        ("postgresql+psycopg://kb:S3CRETPW@127.0.0.1:abc/kbx",
         "Error: malformed database URL 'postgresql+psycopg://kb:***@127.0.0.1:abc/kbx': the port must be a number\n"),
        ("mysql://kb:S3CRETPW@127.0.0.1/kbx",
         "Error: unsupported database URL 'mysql://kb:***@127.0.0.1/kbx': kissbot supports sqlite+pysqlite://, "
         "postgresql+psycopg://\n"),
        ("postgresql+asyncpg://kb:S3CRETPW@127.0.0.1/kbx",
         "Error: unsupported database URL 'postgresql+asyncpg://kb:***@127.0.0.1/kbx': kissbot supports "
         "sqlite+pysqlite://, postgresql+psycopg://\n"),
        ("kissbot.db", "Error: malformed database URL 'kissbot.db': expected BACKEND://…, "
                       "e.g. postgresql+psycopg://user@host/db (a SQLite file is given with --db PATH)\n"),
        (" postgresql+psycopg://kb:S3CRETPW@127.0.0.1/kbx",
         "Error: malformed database URL ' postgresql+psycopg://kb:***@127.0.0.1/kbx': expected BACKEND://…, "
         "e.g. postgresql+psycopg://user@host/db (a SQLite file is given with --db PATH)\n"),
        ("postgresql+psycopg://kb:S3C@RETPW/x@127.0.0.1/kbx",
         "Error: malformed database URL 'postgresql+psycopg://kb:***@127.0.0.1/kbx': write '@' as %40 in a user name "
         "or password\n"),
        ("postgresql+psycopg://kb:S3C@RETPW@127.0.0.1/kbx",
         "Error: malformed database URL 'postgresql+psycopg://kb:***@127.0.0.1/kbx': write '@' as %40 in a user name "
         "or password\n"),
        ("sqlite://kb:S3CRETPW@127.0.0.1/kbx",
         "Error: malformed database URL 'sqlite://kb:***@127.0.0.1/kbx': a SQLite URL names a file "
         "(sqlite:///relative.db, sqlite:////absolute.db), with no user, password, host or port\n"),
    ],
)
@pytest.mark.parametrize("command", [["init-db"], ["stats"], ["migrate-yaml", "config.yaml"]])
def test_a_bad_url_is_refused_in_one_line_without_its_password_and_writes_nothing(
    runner, tmp_path, monkeypatch, url, message, command
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("twitch:\n  tokens:\n    bot:\n      user_id: '1'\n"
                                          "      access_token: a\n      refresh_token: r\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = runner.invoke(cli, [*command, "--url", url])
    assert (result.exit_code, result.output) == (1, message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("option", "where"), [("--url", "sqlite://"), ("--url", "sqlite:///"), ("--db", ":memory:")])
@pytest.mark.parametrize("command", [["users"], ["init-db"], ["tokens", "--reveal"], ["cleanup-logs"]], ids=" ".join)
def test_an_in_memory_database_is_refused_in_one_line(runner, tmp_path, monkeypatch, option, where, command):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, [*command, option, where])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: {where} is an in-memory SQLite database, empty and gone when the command ends: "
        "give a file (--db PATH, or --url sqlite:///PATH) or a PostgreSQL URL\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_url_typo_given_as_a_path_is_refused_too(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["init-db", "--db", TYPO])
    assert result.exit_code == 1
    assert result.output.startswith("Error: malformed database URL 'postgresql+psycopg:/kb:***@")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigurationError, match="malformed database URL") as raised:
        DatabaseManager(url=TYPO, key_file=tmp_path / "k")
    assert "S3CRETPW" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_postgresql_without_a_driver_means_psycopg(postgresql_url, tmp_path):
    bare = postgresql_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with DatabaseManager(url=bare, key_file=tmp_path / "k") as mgr:
        assert mgr.engine.url.drivername == "postgresql+psycopg"
        assert mgr.get_config("max_crash_count") == 3


def test_a_closed_port_raises_database_unavailable_from_the_driver_error(tmp_path):
    import psycopg

    with pytest.raises(DatabaseUnavailable, match=r"^cannot open database nowhere: connection failed: ") as raised:
        DatabaseManager(url="postgresql+psycopg://kb:S3CRETPW@127.0.0.1:1/nowhere", key_file=tmp_path / "k")
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)
    assert "S3CRETPW" not in str(raised.value)


def test_terminated_backends_raise_database_unavailable_once_then_reads_and_writes_reconnect(postgresql_url, tmp_path):
    with DatabaseManager(url=postgresql_url, key_file=tmp_path / "k") as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.close()
        pids: list[int] = []
        sqlalchemy.event.listen(mgr.engine, "connect", lambda dbapi_conn, _record: pids.append(dbapi_conn.info.backend_pid))

        def restart() -> None:  # every session of the store ends, as in a server restart
            admin = sqlalchemy.create_engine(postgresql_url)
            with admin.begin() as conn:
                for pid in pids:
                    assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar_one() is True
            admin.dispose()
            pids.clear()

        mgr.store_tokens(uid, "access", "refresh", 3600)
        restart()
        with pytest.raises(DatabaseUnavailable, match="^cannot open database "):
            mgr.get_tokens(uid)
        mgr.store_tokens(uid, "access-2", "refresh-2", 3600)
        assert mgr.get_tokens(uid)["access_token"] == "access-2"
        with mgr.session() as session:  # a pooled connection beside the one the manager keeps
            session.execute(sqlalchemy.text("SELECT 1"))
        restart()
        with pytest.raises(DatabaseUnavailable, match="^cannot open database "), mgr.session() as session:
            session.execute(sqlalchemy.text("SELECT 1"))
        assert mgr.get_tokens(uid)["access_token"] == "access-2"  # the manager's connection, lost too, was replaced
        mgr.store_tokens(uid, "access-3", "refresh-3", 3600)


def test_tokens_behind_another_sessions_lock_ends_with_one_line(runner, postgresql_url, tmp_path):
    key = tmp_path / "k"
    with DatabaseManager(url=postgresql_url, key_file=key, busy_timeout_ms=500) as mgr:
        mgr.store_tokens(mgr.create_user("1", "serda_bot"), "access", "refresh", 3600)
        # The same wait limit applies to library calls.
        holder = sqlalchemy.create_engine(postgresql_url)
        locked, release = threading.Event(), threading.Event()

        def hold_lock() -> None:
            with holder.begin() as conn:
                conn.exec_driver_sql("LOCK TABLE oauth_tokens IN ACCESS EXCLUSIVE MODE")
                locked.set()
                release.wait(60)

        thread = threading.Thread(target=hold_lock)
        thread.start()
        try:
            assert locked.wait(30)
            with pytest.raises(DatabaseBusy, match="another session held a lock for more than 500 ms"):
                mgr.get_tokens(1)
            result = runner.invoke(cli, ["tokens", "--url", postgresql_url, "--key-file", str(key)])
        finally:
            release.set()
            thread.join(60)
            holder.dispose()
    assert result.exit_code == 1
    assert result.output.startswith("Error: database ")
    assert "is busy: another session held a lock for more than 5000 ms" in result.output
    assert result.output.count("\n") == 1


def url_commands() -> list[list[str]]:
    """Every command taking ``--url``, with its required arguments and options filled in."""
    fill = {"login": "serda_bot", "version": "1", "instance_id": "1", "key": "log_retention_days", "value": "30",
            "config": "config.yaml", "file": "config.yaml"}
    found: list[list[str]] = []

    def walk(command: click.Command, path: list[str], ctx: click.Context) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                walk(sub, [*path, name], click.Context(sub, parent=ctx, info_name=name))
        if any(p.name == "url" and isinstance(p, click.Option) for p in command.params):
            arguments = [fill[p.name] for p in command.params if isinstance(p, click.Argument) and p.required]
            options = [o for p in command.params if isinstance(p, click.Option) and p.required for o in (p.opts[0], "1")]
            found.append([*path, *arguments, *options])

    walk(cli, [], click.Context(cli, info_name="kissbot"))
    return found


@pytest.mark.parametrize(
    "url",
    [TYPO, "postgresql+psycopg://kb:S3CRETPW@127.0.0.1:abc/kbx", "mysql://kb:S3CRETPW@127.0.0.1/kbx",
     "sqlite://kb:S3CRETPW@127.0.0.1/kbx", "postgresql+psycopg://kb:S3C@RETPW/x@127.0.0.1/kbx"],
    ids=["typo", "port", "mysql", "sqlite-host", "at-in-password"],
)
def test_every_command_taking_url_refuses_a_bad_one_in_one_line_and_writes_nothing(runner, tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("twitch:\n  tokens:\n    bot:\n      user_id: '1'\n"
                                          "      access_token: a\n      refresh_token: r\n")
    commands = url_commands()
    assert len(commands) >= 25
    for command in commands:
        args = [*command, "--url", url] if command else ["--url", url, "stats"]  # the group's own --url
        result = runner.invoke(cli, args, input="a\nb\n", env={"TWITCH_CLIENT_ID": "x"})
        assert result.exit_code == 1, (command, result.output)
        assert result.output.startswith("Error: malformed database URL ") or result.output.startswith(
            "Error: unsupported database URL "
        ), (command, result.output)
        assert result.output.count("\n") == 1 and "S3C" not in result.output and "RETPW" not in result.output
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml"], command


def test_maintenance_and_metrics_need_an_existing_file_backed_store(tmp_path):
    from kissbot.errors import DatabaseError, NoDatabase
    from kissbot.maintenance import open_existing
    from kissbot.metrics import open_engine

    for open_store, in_memory in ((open_existing, DatabaseError), (open_engine, ConfigurationError)):
        for where in ("sqlite://", ":memory:"):
            with pytest.raises(in_memory, match="^an in-memory database"):
                open_store(where)
        with pytest.raises(NoDatabase, match=f"^database {tmp_path}/nope.db does not exist; create it with kissbot init-db$"):
            open_store(tmp_path / "nope.db")
    assert list(tmp_path.iterdir()) == []
