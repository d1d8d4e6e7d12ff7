"""Inspection commands: ``users``, ``tokens``, ``instances``, ``audit``, ``config``.

They open the store with ``create=False``: pointed at a database that does not
exist, they say so instead of creating an empty store and a key.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import click

from kissbot.cli.main import StoreTarget, cli, echo_json, echo_json_rows, store_options
from kissbot.crypto import mask_secret
from kissbot.errors import UserNotFound
from kissbot.repo import AuditRepository, TokenRepository, UserRepository
from kissbot.validation import MAX_EXPIRES_IN, MAX_ID

_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
_LIMIT = click.option("--limit", type=click.IntRange(1, MAX_ID), help="Show at most N rows  [default: all].")
_WIDTH_ROWS = 1000
"""Rows a table's column widths are taken from: the rest stream under them (a longer cell widens its line only)."""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _table(headers: list[str], rows: Iterable[list[Any]]) -> None:
    """Print rows under headers in aligned columns, or "(none)"; rows stream, in constant memory."""
    rows = iter(rows)
    first = [[_cell(v) for v in row] for row in itertools.islice(rows, _WIDTH_ROWS)]
    if not first:
        click.echo("(none)")
        return
    widths = [max(len(row[i]) for row in [headers, *first]) for i in range(len(headers))]
    for row in itertools.chain([headers], first, ([_cell(v) for v in row] for row in rows)):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# --- users -------------------------------------------------------------------------------------


@cli.command()
@_LIMIT
@_JSON
@store_options
def users(store: StoreTarget, limit: int | None, as_json: bool) -> None:
    """List the users (bots and channels), by login.

    \b
    Example:
        kissbot users --db kissbot.db --json
        kissbot users --limit 20
    """
    with store.open(create=False, need_key=False) as mgr, mgr.engine.connect() as conn:
        rows = UserRepository(conn).iter_users(limit)
        if as_json:
            echo_json_rows(rows)
            return
        _table(
            ["id", "login", "display_name", "twitch_user_id", "bot", "created_at"],
            ([u["id"], u["twitch_login"], u["display_name"], u["twitch_user_id"], bool(u["is_bot"]), u["created_at"]] for u in rows),
        )


# --- tokens ------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--reveal", is_flag=True, help="Print the full token values (a warning goes to stderr).")
@_LIMIT
@_JSON
@store_options
@click.pass_context
def tokens(ctx: click.Context, store: StoreTarget, reveal: bool, limit: int | None, as_json: bool) -> None:
    """List each user's tokens: expiry, needs_reauth, refresh failures (alone), or store tokens (`set`).

    The listing reads no token value and needs no key file; --reveal
    decrypts and prints the full values (a row whose values do not decrypt
    says so).

    \b
    Example:
        kissbot tokens --db kissbot.db
        kissbot tokens --json --limit 100
        kissbot tokens --reveal --json --key-file /etc/kissbot/kissbot.key
        kissbot tokens set serda_bot --expires-in 14400 --db kissbot.db
    """
    if ctx.invoked_subcommand:
        return
    with store.open(create=False, need_key=reveal) as mgr, mgr.engine.connect() as conn:
        if reveal:
            click.echo("Warning: printing full OAuth tokens; anyone who sees them can act as these users.", err=True)
        rows = TokenRepository(conn).iter_tokens(decrypt=reveal, limit=limit)
        if as_json:
            echo_json_rows(rows)
            return
        values = ["access_token", "refresh_token"] if reveal else []
        _table(
            ["login", "type", "expires_at", "needs_reauth", "failures", *values],
            (
                [
                    r["twitch_login"],
                    r["token_type"],
                    f"{_cell(r['expires_at'])} (expired)" if r["expired"] else r["expires_at"],
                    r["needs_reauth"],
                    r["refresh_failures"],
                    *(["(does not decrypt)" if r["decrypt_error"] else r[v] for v in values]),
                ]
                for r in rows
            ),
        )


def _read_tokens() -> tuple[str, str]:
    """The access and refresh tokens from a hidden prompt or, when stdin is not a terminal, its first two lines."""
    stdin = sys.stdin
    tokens = []
    for name in ("access token", "refresh token"):
        value = click.prompt(name, hide_input=True, err=True) if stdin.isatty() else stdin.readline()
        value = value.strip().removeprefix("oauth:")
        if not value:
            raise click.ClickException(
                f"no {name} given (stdin: the access token, then the refresh token, one per line)"
            )
        tokens.append(value)
    return tokens[0], tokens[1]


@tokens.command("set")
@click.argument("login")
@click.option(
    "--type", "token_type", type=click.Choice(["bot", "broadcaster"]), default="bot", show_default=True,
    help="Which of the user's tokens.",
)
@click.option(
    "--expires-in", type=click.IntRange(1, MAX_EXPIRES_IN), required=True,
    help="Seconds until the access token expires (Twitch's expires_in).",
)
@click.option("--scopes", default="", help="Comma-separated scopes, e.g. chat:read,chat:edit.")
@store_options
def tokens_set(store: StoreTarget, login: str, token_type: str, expires_in: int, scopes: str) -> None:
    """Store LOGIN's tokens, read from stdin or a hidden prompt (never from the command line).

    Stdin holds the access token on its first line and the refresh token on
    its second; an `oauth:` prefix is stripped. The tokens are encrypted like
    any other write, needs_reauth is cleared and the audit log records it.

    \b
    Example:
        printf '%s\\n%s\\n' "$ACCESS" "$REFRESH" | kissbot tokens set serda_bot --expires-in 14400
    """
    access_token, refresh_token = _read_tokens()
    scope_list = [s.strip() for s in scopes.split(",") if s.strip()]
    with store.open(create=False) as mgr:
        user = mgr.get_user_by_login(login)
    if user is None:
        raise UserNotFound(f"no user with login {login[:40]!r}; create it with kissbot user add")
    with store.open() as mgr:  # the first tokens of a store create its key
        mgr.store_tokens(user["id"], access_token, refresh_token, expires_in, scope_list, token_type=token_type)
    click.echo(
        f"Stored {token_type} tokens of {user['twitch_login']} ({mask_secret(access_token)}), "
        f"expiring in {expires_in} s"
    )


# --- instances ---------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@_JSON
@store_options
@click.pass_context
def instances(ctx: click.Context, store: StoreTarget, as_json: bool) -> None:
    """List the bot instances (alone), or act on one (subcommands).

    \b
    Example:
        kissbot instances --db kissbot.db
        kissbot instances reset 3 --db kissbot.db
        kissbot instances reap --db kissbot.db
    """
    if ctx.invoked_subcommand:
        return
    with store.open(create=False, need_key=False) as mgr:
        rows = mgr.list_instances()
    if as_json:
        echo_json(rows)
        return
    _table(
        ["id", "channel", "bot", "status", "pid", "last_heartbeat", "crashes"],
        [[i["id"], i["channel_login"], i["bot_login"], i["status"], i["pid"], i["last_heartbeat"], i["crash_count"]] for i in rows],
    )


@instances.command("reset")
@click.argument("instance_id", metavar="ID", type=click.IntRange(1, MAX_ID))
@store_options
def instances_reset(store: StoreTarget, instance_id: int) -> None:
    """Re-enable an instance disabled after too many crashes.

    \b
    Example:
        kissbot instances reset 3 --db kissbot.db
    """
    with store.open(create=False, need_key=False) as mgr:
        mgr.reset_instance(instance_id)
    click.echo(f"Instance {instance_id} reset: status stopped, crash count 0")


@instances.command("reap")
@store_options
def instances_reap(store: StoreTarget) -> None:
    """Mark running instances without a heartbeat for 3 health-check intervals as crashed.

    Each one counts toward max_crash_count and is disabled at that count.
    Run it from the supervisor or cron, e.g. every health_check_interval.

    \b
    Example:
        kissbot instances reap --db kissbot.db
    """
    with store.open(create=False, need_key=False) as mgr:
        reaped = mgr.reap_stale_instances()
    for inst in reaped:
        heartbeat = inst["last_heartbeat"]
        since = heartbeat.strftime("%Y-%m-%d %H:%M:%S UTC") if heartbeat is not None else "never"
        click.echo(
            f"Instance {inst['id']} ({inst['bot_login']} on {inst['channel_login']}, pid {inst['pid']}): "
            f"last heartbeat {since}, now {inst['status']} (crash {inst['crash_count']})"
        )
    click.echo(f"Reaped {len(reaped)} stale instance{'' if len(reaped) == 1 else 's'}.")


# --- audit -------------------------------------------------------------------------------------


@cli.command()
@click.option("--limit", type=click.IntRange(1, MAX_ID), default=50, show_default=True, help="Newest events to show.")
@click.option("--event-type", help="Only events of this type, e.g. tokens_refreshed.")
@click.option("--user", "login", metavar="LOGIN", help="Only events of this user.")
@_JSON
@store_options
def audit(store: StoreTarget, limit: int, event_type: str | None, login: str | None, as_json: bool) -> None:
    """Show the audit log, newest first.

    \b
    Example:
        kissbot audit --limit 20 --event-type tokens_migrated
        kissbot audit --user serda_bot --json
    """
    with store.open(create=False, need_key=False) as mgr, mgr.engine.connect() as conn:
        user_id = None
        if login is not None:
            user = UserRepository(conn).get_user_by_login(login)
            if user is None:
                raise UserNotFound(f"no user with login {login!r}")
            user_id = user["id"]
        events = AuditRepository(conn).iter_audit_log(limit, event_type, user_id, logins=True)
        if as_json:
            echo_json_rows(events)
            return
        shown = False
        for e in events:
            shown = True
            who = f" user={e['user_login']}" if e["user_login"] else ""
            where = f" channel={e['channel_login']}" if e["channel_login"] else ""
            details = f" {json.dumps(e['details'], ensure_ascii=False)}" if e["details"] is not None else ""
            click.echo(f"{_cell(e['timestamp'])} {e['severity']:<7} {e['event_type']}{who}{where}{details}")
    if not shown:
        click.echo("(none)")


# --- config ------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@cli.group()
def config() -> None:
    """Read and change the system settings (config table).

    \b
    Example:
        kissbot config list
        kissbot config set log_retention_days 60 --description "Audit log retention"
    """


@config.command("get")
@click.argument("key")
@_JSON
@store_options
def config_get(store: StoreTarget, key: str, as_json: bool) -> None:
    """Print the value of one setting.

    \b
    Example:
        kissbot config get max_crash_count --db kissbot.db
    """
    missing = object()
    with store.open(create=False, need_key=False) as mgr:
        value = mgr.get_config(key, default=missing)
    if value is missing:
        raise click.ClickException(f"no config key {key!r}; see kissbot config list")
    if as_json:
        echo_json({"key": key, "value": value})
    else:
        click.echo(_shown(value))


@config.command("set", context_settings={"ignore_unknown_options": True})  # a negative VALUE is not an option
@click.argument("key")
@click.argument("value")
@click.option("--description", help="What the setting is for.")
@store_options
def config_set(store: StoreTarget, key: str, value: str, description: str | None) -> None:
    """Set a setting (the value is stored as text; "60" reads back as 60).

    \b
    Example:
        kissbot config set log_retention_days 60 --db kissbot.db
    """
    if value.startswith("-") and not _is_number(value):
        raise click.UsageError(f"No such option: {value}")
    with store.open(create=False, need_key=False) as mgr:
        mgr.set_config(key, value, description)
    click.echo(f"{key} = {value}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@config.command("list")
@_JSON
@store_options
def config_list(store: StoreTarget, as_json: bool) -> None:
    """List every setting with its description.

    \b
    Example:
        kissbot config list --json
    """
    with store.open(create=False, need_key=False) as mgr:
        rows = mgr.list_config()
    if as_json:
        echo_json(rows)
        return
    _table(["key", "value", "description"], [[r["key"], _shown(r["value"]), r["description"]] for r in rows])
