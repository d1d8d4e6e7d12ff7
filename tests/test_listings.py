"""`kissbot users`, `tokens` and `audit`: one query whatever the row count, the JSON of today, `--limit` (issues 17, 18)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import event
from sqlalchemy.engine import Engine

from kissbot import DatabaseManager
from kissbot.cli import cli


def fill(store_url: str, key: Path, users: int) -> list[str]:
    """``users`` users with tokens and an audit event each; return the CLI's store options."""
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        for i in range(users):
            uid = mgr.create_user(str(1000 + i), f"user_{i:03d}", is_bot=i % 2 == 0)
            mgr.store_tokens(uid, f"access-{i}-0123456789", f"refresh-{i}-0123456789", 3600 + i, scopes=["chat:read"])
    return ["--url", store_url, "--key-file", str(key)]


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process sends while the block runs."""
    sent: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def reading(sent: list[str], table: str) -> list[str]:
    return [s for s in sent if s.lstrip().upper().startswith("SELECT") and f"FROM {table}" in s]


@pytest.mark.parametrize("command", [["tokens"], ["tokens", "--json"], ["tokens", "--reveal", "--json"]], ids=" ".join)
def test_tokens_listing_is_one_query_whatever_the_row_count(store_url, tmp_path, command):
    options = fill(store_url, tmp_path / "k.key", 25)
    with statements() as sent:
        result = invoke(*command, *options)
    assert len(reading(sent, "oauth_tokens JOIN users")) == 1
    assert not [s for s in reading(sent, "oauth_tokens") if "WHERE oauth_tokens.user_id =" in s]  # no query per row
    assert result.output.count("user_0") == 25


def test_users_and_audit_listings_are_one_query(store_url, tmp_path):
    options = fill(store_url, tmp_path / "k.key", 12)
    with statements() as sent:
        invoke("users", "--json", *options)
    assert len(reading(sent, "users")) == 1
    with statements() as sent:
        events = json.loads(invoke("audit", "--json", "--limit", "1000", *options).stdout)
    assert len(events) == 24 and [s for s in sent if "FROM users" in s] == []  # logins come joined to the events
    assert len(reading(sent, "audit_log")) == 1
    created = [e for e in events if e["event_type"] == "user_created"]
    assert sorted(e["user_login"] for e in created) == [f"user_{i:03d}" for i in range(12)]
    assert list(created[0])[-2:] == ["user_login", "channel_login"] and created[0]["channel_login"] is None


def expected_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False, default=lambda v: v.isoformat()) + "\n"


def test_streamed_json_is_byte_for_byte_the_json_of_the_whole_list(store_url, tmp_path):
    key = tmp_path / "k.key"
    options = fill(store_url, key, 7)
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        users = mgr.list_users()
        tokens = mgr.list_tokens(decrypt=True)
        metadata = mgr.list_tokens()
        events = mgr.get_audit_log(limit=3)
    assert invoke("users", "--json", *options).stdout == expected_json(users)
    assert invoke("tokens", "--reveal", "--json", *options).stdout == expected_json(tokens)
    assert invoke("tokens", "--json", *options).stdout == expected_json(metadata)
    audit = json.loads(invoke("audit", "--json", "--limit", "3", *options).stdout)
    assert [{k: v for k, v in e.items() if not k.endswith("_login")} for e in audit] == json.loads(expected_json(events))


def test_empty_listings_print_an_empty_array(runner_db):
    for command in (["users", "--json"], ["tokens", "--json"], ["audit", "--json", "--event-type", "nothing"]):
        assert invoke(*command, *runner_db).stdout == "[]\n"
    for command in (["users"], ["tokens"]):
        assert invoke(*command, *runner_db).stdout == "(none)\n"


@pytest.fixture
def runner_db(tmp_path: Path) -> list[str]:
    db = tmp_path / "kissbot.db"
    invoke("init-db", "--db", str(db))
    return ["--db", str(db), "--key-file", str(tmp_path / "k.key")]


def test_limit_on_users_and_tokens(store_url, tmp_path):
    options = fill(store_url, tmp_path / "k.key", 5)
    users = json.loads(invoke("users", "--json", "--limit", "2", *options).stdout)
    assert [u["twitch_login"] for u in users] == ["user_000", "user_001"]
    tokens = json.loads(invoke("tokens", "--json", "--limit", "3", *options).stdout)
    assert [t["twitch_login"] for t in tokens] == ["user_000", "user_001", "user_002"]
    assert [k for k in tokens[0] if "token" in k] == ["token_type"]
    table = invoke("tokens", "--limit", "1", *options).stdout.splitlines()
    assert [line.split()[0] for line in table] == ["login", "user_000"]
    assert len(invoke("users", "--limit", "4", *options).stdout.splitlines()) == 1 + 4
    assert len(json.loads(invoke("users", "--json", "--limit", "99", *options).stdout)) == 5


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", str(2**63)])
@pytest.mark.parametrize("command", ["users", "tokens"])
def test_bad_limit_is_one_line_and_writes_nothing(runner_db, tmp_path, command, value):
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = CliRunner().invoke(cli, [command, "--limit", value, *runner_db])
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith("Error: ") and "--limit" in line and "Traceback" not in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_wide_row_after_the_first_thousand_widens_only_its_line(tmp_path):
    key = tmp_path / "k.key"
    db = tmp_path / "kissbot.db"
    with DatabaseManager(db, key) as mgr:
        with mgr.session() as s:
            from kissbot.repo import UserRepository

            UserRepository(s).create_users([{"twitch_user_id": str(i), "twitch_login": f"u{i:04d}"} for i in range(1001)])
            UserRepository(s).create_users([{"twitch_user_id": "x", "twitch_login": "zz_a_much_longer_login_name"}])
    lines = invoke("users", "--db", str(db), "--key-file", str(key)).stdout.splitlines()
    assert len(lines) == 1 + 1002
    assert len({line.index(" u") for line in lines[1:1001]}) == 1  # the first thousand rows are aligned
    assert lines[-1].split()[1] == "zz_a_much_longer_login_name"


def test_iterating_on_an_autocommit_connection_works_too(store_url, tmp_path):
    from kissbot.repo import AuditRepository, TokenRepository, UserRepository

    key = tmp_path / "k.key"
    fill(store_url, key, 3)
    with DatabaseManager(url=store_url, key_file=key) as mgr, mgr.engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        assert [u["twitch_login"] for u in UserRepository(autocommit).iter_users(2)] == ["user_000", "user_001"]
        assert [t["access_token"] for t in TokenRepository(autocommit).iter_tokens(decrypt=True)][-1] == "access-2-0123456789"
        assert len(list(AuditRepository(autocommit).iter_audit_log(logins=True))) == 6
