"""``kissbot auth``: get a Twitch user token into the store (see :mod:`kissbot.auth`)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from kissbot.cli.main import StoreTarget, cli, store_options
from kissbot.cli.twitch import client_options

if TYPE_CHECKING:
    from kissbot.auth import DeviceCode


def _scope_list(scopes: str) -> list[str]:
    return [s.strip() for s in scopes.replace(" ", ",").split(",") if s.strip()]


def _show_code(qr: bool | None) -> Callable[[DeviceCode], None]:
    """Prints what the human needs: the verification URL, the user code, a QR code if asked or on a terminal."""

    def show(device: DeviceCode) -> None:
        minutes = max(1, device.expires_in // 60)
        click.echo(f"Open {device.verification_uri}")
        click.echo(f"and enter the code {device.user_code} (it expires in {minutes} min).")
        if qr or (qr is None and sys.stdout.isatty()):
            _print_qr(device.verification_uri, required=bool(qr))
        click.echo("Waiting for the authorization on Twitch (Ctrl-C to cancel)...")

    return show


def _print_qr(uri: str, required: bool) -> None:
    try:
        import segno
    except ImportError:
        if required:
            raise click.ClickException("--qr needs the segno package: pip install 'kissbot[qr]'") from None
        return
    segno.make(uri, error="l").terminal(out=sys.stdout, compact=True, border=1)


@contextmanager
def _interruptible_sleep() -> Iterator[Callable[[float], None]]:
    """A ``sleep`` for the polling loop that Ctrl-C always ends.

    Ctrl-C raises KeyboardInterrupt where it lands, as usual, and also sets a
    flag: if that KeyboardInterrupt was swallowed (raised inside a finalizer,
    which Python reports and ignores), the next wait between two polls raises it.
    """
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    def sleep(seconds: float) -> None:
        if interrupted.wait(seconds):
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield sleep
    finally:
        signal.signal(signal.SIGINT, previous)


@cli.command("auth")
@click.argument("login", required=False)
@click.option("--scopes", help="Comma-separated scopes, e.g. chat:read,chat:edit  [default: those of the stored token].")
@click.option("--broadcaster", is_flag=True, help="Store the user's broadcaster token (default: the bot token).")
@click.option("--needing-reauth", is_flag=True, help="Reauthorize every token marked needs_reauth, one after the other.")
@click.option(
    "--code-flow", is_flag=True,
    help="Use the authorization code flow (confidential client: needs the client secret) instead of the Device Code flow.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=3000, show_default=True,
    help="--code-flow: Twitch redirects to http://localhost:PORT (register that URL for your application).",
)
@client_options
@click.option(
    "--qr/--no-qr", default=None,
    help="Also print the verification URL as a QR code (needs kissbot[qr])  [default: on a terminal, if installed].",
)
@store_options
def auth(
    store: StoreTarget,
    login: str | None,
    scopes: str | None,
    broadcaster: bool,
    needing_reauth: bool,
    code_flow: bool,
    port: int,
    client_id: str | None,
    client_secret: str | None,
    qr: bool | None,
) -> None:
    """Authorize LOGIN on Twitch and store its tokens (Device Code flow: no browser needed here).

    Prints a URL and a code: open the URL on any device, log in to Twitch as
    LOGIN and enter the code. The token is validated; one that belongs to
    another account is refused. The user is created if needed, the tokens
    are stored encrypted (needs_reauth cleared) and the audit log records
    tokens_authorized. Client id from TWITCH_CLIENT_ID.

    \b
    Example:
        kissbot auth serda_bot --scopes chat:read,chat:edit
        kissbot auth serda --broadcaster --scopes channel:read:subscriptions
        kissbot auth --needing-reauth
        kissbot auth serda_bot --scopes chat:read --code-flow --port 3000
    """
    from kissbot.auth import TwitchAuth, obtain_tokens, store_authorization
    from kissbot.cli.user import check_login

    if needing_reauth == (login is not None):
        raise click.UsageError("give either LOGIN or --needing-reauth")
    if login is not None:
        check_login(login)
    with store.open(create=False) as mgr:  # a typo in --db fails now, not after the human authorized
        rows = mgr.list_tokens()
    if login is not None:
        token_type = "broadcaster" if broadcaster else "bot"
        stored = [r["scopes"] for r in rows if r["twitch_login"] == login.lower() and r["token_type"] == token_type]
        if scopes is None and not stored:
            raise click.UsageError(f"{login.lower()} has no stored {token_type} token to take the scopes from: give --scopes")
        targets = [(login, token_type, _scope_list(scopes) if scopes is not None else stored[0])]
    else:
        targets = [(r["twitch_login"], r["token_type"], _scope_list(scopes) if scopes else r["scopes"])
                   for r in rows if r["needs_reauth"]]
        if not targets:
            click.echo("No token needs reauthorization.")
            return
    with _interruptible_sleep() as sleep, TwitchAuth.from_env(
        client_id=client_id, client_secret=client_secret, sleep=sleep
    ) as twitch:
        for target_login, token_type, scope_list in targets:
            click.echo(f"Authorizing {target_login} ({token_type} token, scopes {' '.join(scope_list) or '(none)'}).")
            authorization = obtain_tokens(
                twitch, target_login, scope_list, show_code=_show_code(qr),
                code_flow_port=port if code_flow else None,
                show_url=lambda url: click.echo(f"Open this URL in a browser and authorize:\n{url}"),
            )
            with store.open() as mgr:  # the first tokens of a store create its key
                done = store_authorization(mgr, authorization, token_type=token_type)
            click.echo(
                f"Authorized {done.login} (Twitch id {done.twitch_user_id}{', user created' if done.user_created else ''}): "
                f"{done.token_type} tokens stored, scopes {' '.join(done.scopes) or '(none)'}, "
                f"expiring in {done.expires_in} s"
            )
