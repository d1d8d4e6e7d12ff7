"""``kissbot user add``: create a user by hand (after a manual reauthorization, say)."""

from __future__ import annotations

import re

import click

from kissbot.cli.main import StoreTarget, cli, store_options

_LOGIN = re.compile(r"[A-Za-z0-9_]{1,25}")


def check_login(login: str) -> str:
    """``login`` if it is a Twitch login, else a one-line :class:`click.ClickException`."""
    if not _LOGIN.fullmatch(login):
        raise click.ClickException(f"{login[:40]!r} is not a Twitch login (1 to 25 letters, digits or _)")
    return login


@cli.group()
def user() -> None:
    """Create users by hand (see `kissbot users` to list them).

    \b
    Example:
        kissbot user add serda_bot --twitch-id 123456789 --bot
    """


@user.command("add")
@click.argument("login")
@click.option("--twitch-id", required=True, help="The user's numeric Twitch id (see `kissbot users`).")
@click.option("--display-name", help="Display name (default: LOGIN as written).")
@click.option("--bot", "is_bot", is_flag=True, help="The account is a bot account.")
@store_options
def user_add(store: StoreTarget, login: str, twitch_id: str, display_name: str | None, is_bot: bool) -> None:
    """Create the user LOGIN with its Twitch id; refuse a login or id already taken.

    \b
    Example:
        kissbot user add serda_bot --twitch-id 123456789 --bot --db kissbot.db
    """
    check_login(login)
    if not (twitch_id.isascii() and twitch_id.isdigit() and len(twitch_id) <= 20):
        raise click.ClickException(f"--twitch-id {twitch_id[:40]!r} is not a numeric Twitch id")
    with store.open(create=False, need_key=False) as mgr:
        user_id = mgr.create_user(twitch_id, login, display_name or login, is_bot)
    click.echo(f"User {login.lower()} created (id {user_id}, Twitch id {twitch_id}{', bot' if is_bot else ''})")
