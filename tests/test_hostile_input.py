"""Hostile arguments and files (issue 14, items 6, 7, 9, 14): one line and exit 1, or a typed error."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.cli.main import store_options
from kissbot.errors import UserNotFound, ValidationError

ACCESS = "k9xq2m7w4r1t8y5u3i6o0pa1s2d3f4"
REFRESH = "zz8y7x6w5v4u3t2s1r0qponmlkjihgfedcba9876543210abcd"
CONFIG = f"""\
twitch:
  tokens:
    serda_bot:
      user_id: 1209350837
      access_token: {ACCESS}
      refresh_token: {REFRESH}
"""


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {
        os.fspath(p.relative_to(directory)): (p.stat().st_mode, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    """A deployment with a store holding serda_bot's tokens (so a key file exists too)."""
    (tmp_path / "config.yaml").write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(cli, ["migrate-yaml", str(tmp_path / "config.yaml"), *store(tmp_path), "--no-backup"])
    assert result.exit_code == 0, result.output
    return tmp_path


def store(d: Path) -> list[str]:
    return ["--db", str(d / "kissbot.db"), "--key-file", str(d / ".kissbot.key")]


def assert_one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


HUGE = "99999999999999999999"
OUT_OF_RANGE = {
    "cleanup-days": (["cleanup-logs", "--days", "1000000000"], "'--days'"),
    "audit-limit": (["audit", "--limit", HUGE], "'--limit'"),
    "rotate-batch": (["key", "rotate", "--batch-size", HUGE], "'--batch-size'"),
    "retire-version": (["key", "retire", HUGE], "'VERSION'"),
    "instance-id": (["instances", "reset", HUGE], "'ID'"),
    "validate-interval-inf": (["refresh-worker", "--once", "--validate-interval", "inf"], "'--validate-interval'"),
    "timeout-nan": (["refresh-worker", "--once", "--timeout", "nan"], "'--timeout'"),
    "interval-nan": (["refresh-worker", "--once", "--interval", "nan"], "'--interval'"),
    "migrate-expires-in": (["migrate-yaml", "config.yaml", "--expires-in", "99999999999999"], "'--expires-in'"),
    "import-expires-in": (["import-tio", "config.yaml", "--expires-in", "99999999999999"], "'--expires-in'"),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_numeric_options_out_of_range_are_one_line_errors_that_change_nothing(deploy, monkeypatch, case):
    monkeypatch.chdir(deploy)
    args, option = OUT_OF_RANGE[case]
    before = snapshot(deploy)
    env = {"TWITCH_CLIENT_ID": "id", "TWITCH_CLIENT_SECRET": "secret"}
    line = assert_one_line_error(CliRunner().invoke(cli, [*args, *store(deploy)], env=env))
    assert line.startswith(f"Error: Invalid value for {option}"), line
    assert snapshot(deploy) == before, "no backup, key version or row was added"


def numeric_parameters() -> dict[str, tuple[list[str], click.Parameter]]:
    """Every numeric option and argument of every ``kissbot`` command, by ``command path/parameter``."""
    found: dict[str, tuple[list[str], click.Parameter]] = {}

    def walk(command: click.Command, path: list[str], ctx: click.Context) -> None:
        for param in command.params:
            counter = getattr(param, "count", False)  # -v, -vv: not a value
            if isinstance(param.type, (click.types._NumberParamTypeBase, click.types.FloatParamType)) and not counter:
                found[f"{' '.join(path)}/{param.name}"] = (path, param)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                walk(sub, [*path, name], click.Context(sub, parent=ctx, info_name=name))

    walk(cli, [], click.Context(cli, info_name="kissbot"))
    return found


NUMERIC = numeric_parameters()


def test_every_numeric_parameter_is_bounded_on_both_sides():
    assert len(NUMERIC) >= 15, sorted(NUMERIC)
    unbounded = [name for name, (_, p) in NUMERIC.items() if getattr(p.type, "min", None) is None or getattr(p.type, "max", None) is None]
    assert unbounded == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", HUGE, f"-{HUGE}", "abc", ""])
@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_every_numeric_parameter_refuses_hostile_values_in_one_line(deploy, monkeypatch, name, value):
    monkeypatch.chdir(deploy)
    path, param = NUMERIC[name]
    given = [param.opts[0], value] if isinstance(param, click.Option) else ["--", value]
    before = snapshot(deploy)
    result = CliRunner().invoke(cli, [*path, *store(deploy), *given])
    line = assert_one_line_error(result)
    assert line.startswith(f"Error: Invalid value for '{param.opts[0] if isinstance(param, click.Option) else param.human_readable_name}'"), line
    assert snapshot(deploy) == before


def test_usage_errors_are_one_line_and_group_help_is_kept():
    for args, message in (
        (["nope"], "Error: No such command 'nope'."),
        (["--bogus"], "Error: No such option '--bogus'."),
        (["key", "--bogus"], "Error: No such option '--bogus'."),
        (["stats", "--db"], "Error: Option '--db' requires an argument."),
        (["config", "set"], "Error: Missing argument 'KEY'."),
        (["copy"], "Error: Missing option '--to'."),
    ):
        assert assert_one_line_error(CliRunner().invoke(cli, args)) == message
    for group in ([], ["key"], ["config"]):
        shown = CliRunner().invoke(cli, group)
        assert shown.output.startswith("Usage: ") and "Commands:" in shown.output, shown.output
        assert "Error" not in shown.output
        assert CliRunner().invoke(cli, [*group, "--help"]).exit_code == 0


@pytest.fixture
def failing_command():
    """A command of the real ``kissbot`` group that fails with an error nobody foresaw."""

    @cli.command("test-boom")
    @store_options
    def boom(store) -> None:
        raise ZeroDivisionError(f"cannot divide {ACCESS} by zero")

    yield
    cli.commands.pop("test-boom")


def test_any_unexpected_error_is_one_masked_line_and_v_shows_the_traceback(failing_command):
    line = assert_one_line_error(CliRunner().invoke(cli, ["test-boom"]))
    assert line == "Error: unexpected ZeroDivisionError (cannot divide k9xq… by zero); run with -v for the traceback"
    verbose = CliRunner().invoke(cli, ["test-boom", "-v"])
    assert verbose.exit_code == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == line
    assert ACCESS not in verbose.output


# --- files: duplicate keys, deep nesting, echoed input -------------------------------------------


BAD_FILES = {
    "yaml-duplicate-login": (
        "migrate-yaml", "config.yaml", CONFIG + "    serda_bot:\n      user_id: 1\n      access_token: a\n      refresh_token: b\n",
        "Error: {d}/config.yaml is not valid YAML: found duplicate key 'serda_bot' at line 7, column 5",
    ),
    "yaml-duplicate-field": (
        "migrate-yaml", "config.yaml", CONFIG + "      user_id: 44456636\n",
        "Error: {d}/config.yaml is not valid YAML: found duplicate key 'user_id' at line 7, column 7",
    ),
    "yaml-deep": ("migrate-yaml", "config.yaml", "[" * 100_000, "Error: {d}/config.yaml is not valid YAML: "),
    "yaml-secret-tag": (
        "migrate-yaml", "config.yaml", f"twitch: !{REFRESH} x\n",
        "Error: {d}/config.yaml is not valid YAML: could not determine a constructor for the tag '!zz8y…' at line 1",
    ),
    "json-duplicate-id": (
        "import-tio", ".tio.tokens.json",
        '{"1209350837": {"token": "a", "refresh": "b"}, "1209350837": {"token": "c", "refresh": "d"}}',
        "Error: {d}/.tio.tokens.json is not valid JSON: duplicate key '1209350837'",
    ),
    "json-deep": ("import-tio", ".tio.tokens.json", "[" * 100_000 + "]" * 100_000, "Error: {d}/.tio.tokens.json is not valid JSON: it is nested too deeply"),
    "json-secret-key": (
        "import-tio", ".tio.tokens.json", json.dumps({REFRESH: {"token": "a", "refresh": "b"}}),
        "Error: .tio.tokens.json[zz8y…]: user_id must be a number or a string of digits",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_token_files_are_one_line_without_secrets_and_change_nothing(deploy, case):
    command, name, text, message = BAD_FILES[case]
    source = deploy / name
    source.write_text(text, encoding="utf-8")
    before = snapshot(deploy)
    line = assert_one_line_error(CliRunner().invoke(cli, [command, str(source), *store(deploy)]))
    assert line.startswith(message.format(d=deploy)), line
    assert REFRESH not in line and len(line) < 200 + len(str(deploy))
    assert snapshot(deploy) == before


# --- the library's arguments ---------------------------------------------------------------------


def nested_too_deep() -> dict:
    details: dict = {}
    inner = details
    for _ in range(200):
        inner["a"] = {}
        inner = inner["a"]
    return details


def circular() -> dict:
    details: dict = {"x": 1}
    details["self"] = details
    return details


BAD_CALLS = {
    "expires_in-nan": (lambda m, u: m.store_tokens(u, "a", "r", math.nan), ValidationError, "expires_in must be a finite"),
    "expires_in-inf": (lambda m, u: m.store_tokens(u, "a", "r", math.inf), ValidationError, "expires_in must be a finite"),
    "expires_in-str": (lambda m, u: m.store_tokens(u, "a", "r", "3600"), ValidationError, "expires_in must be a number"),
    "expires_in-huge": (lambda m, u: m.store_tokens(u, "a", "r", 10**15), ValidationError, "expires_in must be a finite"),
    "scopes-str": (lambda m, u: m.store_tokens(u, "a", "r", 60, scopes="chat:read"), ValidationError, "scopes must be a list"),
    "scopes-int": (lambda m, u: m.store_tokens(u, "a", "r", 60, scopes=[1]), ValidationError, "scopes must be a list"),
    "user_id-str": (lambda m, u: m.get_tokens("1"), ValidationError, "user_id must be an integer"),
    "user_id-unknown-tokens": (lambda m, u: m.store_tokens(u + 99, "a", "r", 60), UserNotFound, "no user with id"),
    "user_id-unknown-event": (lambda m, u: m.log_event("x", user_id=u + 99), UserNotFound, "no user with id"),
    "event_type-none": (lambda m, u: m.log_event(None), ValidationError, "event_type must be a string"),
    "details-circular": (lambda m, u: m.log_event("x", details=circular()), ValidationError, "must not be circular"),
    "details-tuple-key": (lambda m, u: m.log_event("x", details={(1, 2): 3}), ValidationError, "keys must be strings"),
    "details-nan": (lambda m, u: m.log_event("x", details={"v": [math.nan]}), ValidationError, "finite numbers"),
    "details-deep": (lambda m, u: m.log_event("x", details=nested_too_deep()), ValidationError, "nested too deeply"),
    "details-not-dict": (lambda m, u: m.log_event("x", details=["a"]), ValidationError, "must be a dict"),
    "login-none": (lambda m, u: m.create_user("2", None), ValidationError, "twitch_login must be a string"),
    "login-lookup-none": (lambda m, u: m.get_user_by_login(None), ValidationError, "login must be a string"),
    "twitch_id-letters": (lambda m, u: m.create_user("abc", "x"), ValidationError, "twitch_user_id must be"),
    "instance-login-none": (lambda m, u: m.register_instance(None, "serda_bot", 1), ValidationError, "login must be"),
    "audit-limit": (lambda m, u: m.get_audit_log(limit=10**30), ValidationError, "limit must be between"),
    "cleanup-days": (lambda m, u: m.cleanup_old_logs(10**10), ValidationError, "days must be between"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_library_arguments_raise_typed_errors_and_write_nothing(mgr, bot, case):
    call, error, message = BAD_CALLS[case]
    mgr.store_tokens(bot, ACCESS, REFRESH, 60)
    before = (mgr.get_audit_log(limit=1000), mgr.get_tokens(bot), mgr.list_users())
    with pytest.raises(error, match=message):
        call(mgr, bot)
    assert (mgr.get_audit_log(limit=1000), mgr.get_tokens(bot), mgr.list_users()) == before


SECRET_DETAILS = {
    "top": {"refresh_token": "x"},
    "camel": {"refreshToken": "x"},
    "title": {"Refresh_Token": "x"},
    "dashed": {"client-secret": "x"},
    "nested": {"nested": {"refresh_token": "x"}},
    "in-list": {"events": [{"ok": 1}, {"accessToken": "x"}]},
    "value-equal-to-refresh": {"note": REFRESH},
    "value-equal-to-access-nested": {"a": [{"b": ACCESS}]},
}


@pytest.mark.parametrize("case", sorted(SECRET_DETAILS))
def test_the_audit_guard_refuses_secrets_at_any_depth_and_spelling(mgr, bot, case):
    mgr.store_tokens(bot, ACCESS, REFRESH, 60)
    before = mgr.get_audit_log(limit=1000)
    with pytest.raises(ValidationError, match="audit details must not hold secrets"):
        mgr.log_event("bot_note", user_id=bot, details=SECRET_DETAILS[case])
    assert mgr.get_audit_log(limit=1000) == before
    mgr.log_event("bot_note", user_id=bot, details={"token_type": "bot", "note": "fine", "nested": {"ok": [1, 2.5]}})


@pytest.mark.parametrize("which", ["new access", "new refresh", "stored broadcaster"])
def test_store_tokens_refuses_a_scope_equal_to_a_token_and_writes_nothing(mgr, bot, which):
    new_access, new_refresh = "new-access-token-abcdefghijkl", "new-refresh-token-abcdefghijk"
    mgr.store_tokens(bot, ACCESS, REFRESH, 60)
    mgr.store_tokens(bot, "broadcaster-access-abcdefghijk", "broadcaster-refresh-abcdefghij", 60, token_type="broadcaster")
    scope = {"new access": new_access, "new refresh": new_refresh, "stored broadcaster": "broadcaster-refresh-abcdefghij"}
    before = (mgr.get_audit_log(limit=1000), mgr.get_tokens(bot))
    with pytest.raises(ValidationError, match="audit details must not hold secrets"):
        mgr.store_tokens(bot, new_access, new_refresh, 60, scopes=["chat:read", scope[which]])
    assert (mgr.get_audit_log(limit=1000), mgr.get_tokens(bot)) == before


def test_audit_json_stays_valid_json(mgr, bot, store_url, key_file):
    with pytest.raises(ValidationError):
        mgr.log_event("x", user_id=bot, details={"v": math.inf})
    mgr.log_event("x", user_id=bot, details={"v": 1.5, "when": "now"})
    result = CliRunner().invoke(cli, ["audit", "--json", "--url", store_url, "--key-file", str(key_file)])
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    events = json.loads(result.output, parse_constant=refuse)
    assert [e["details"] for e in events if e["event_type"] == "x"] == [{"v": 1.5, "when": "now"}]


def test_scopes_round_trip_as_given(mgr, bot):
    mgr.store_tokens(bot, "a", "r", 60, scopes=("chat:read", "chat:edit"))
    assert mgr.get_tokens(bot)["scopes"] == ["chat:read", "chat:edit"]


WINDOW_CALLS = {
    "claim-ttl-nan": (lambda m, u: m.claim_refresh(u, "me", math.nan), "ttl must be a finite number"),
    "claim-ttl-huge": (lambda m, u: m.claim_refresh(u, "me", 1e300), "ttl must be"),
    "claim-owner-none": (lambda m, u: m.claim_refresh(u, None, 60), "owner must be a string"),
    "refresh-window-inf": (lambda m, u: m.get_tokens_needing_refresh(math.inf), "buffer_minutes must be"),
    "refresh-window-str": (lambda m, u: m.get_tokens_needing_refresh("10"), "buffer_minutes must be a number"),
}


@pytest.mark.parametrize("case", sorted(WINDOW_CALLS))
def test_lease_and_window_arguments_raise_validation_errors(mgr, bot, case):
    call, message = WINDOW_CALLS[case]
    mgr.store_tokens(bot, ACCESS, REFRESH, 60)
    with pytest.raises(ValidationError, match=message):
        call(mgr, bot)
    assert mgr.claim_refresh(bot, "me", 60), "no lease was taken"
