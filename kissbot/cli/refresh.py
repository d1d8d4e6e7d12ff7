"""``kissbot refresh-worker``: keep every stored token fresh (see :mod:`kissbot.refresh`)."""

from __future__ import annotations

import signal
import threading

import click

from kissbot.cli.main import Seconds, StoreTarget, cli, store_options
DAY = 24 * 3600
MAX_INTERVAL = 10**10
"""Longest validation interval, in seconds (~300 years, "never"): dates computed from it stay representable."""
from kissbot.twitch import (
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    DEFAULT_TOKEN_URL,
    DEFAULT_VALIDATE_URL,
    TOKEN_URL_ENV,
    VALIDATE_URL_ENV,
)


@cli.command("refresh-worker")
@click.option("--once", is_flag=True, help="Run one refresh and validation pass, then exit.")
@click.option(
    "--interval", type=Seconds(1, DAY), default=60.0, show_default=True, help="Seconds between passes."
)
@click.option(
    "--token-url", envvar=TOKEN_URL_ENV, show_envvar=True, default=DEFAULT_TOKEN_URL, show_default=True,
    help="Twitch's token endpoint.",
)
@click.option(
    "--validate-url", envvar=VALIDATE_URL_ENV, show_envvar=True, default=DEFAULT_VALIDATE_URL, show_default=True,
    help="Twitch's validation endpoint.",
)
@click.option("--client-id", envvar=CLIENT_ID_ENV, show_envvar=True, help="Twitch application client id.")
@click.option(
    "--client-secret", envvar=CLIENT_SECRET_ENV, show_envvar=True,
    help="Twitch application client secret (prefer the environment variable).",
)
@click.option(
    "--validate-interval", type=Seconds(0, MAX_INTERVAL),
    help="Seconds between validations of a token  [default: config token_validate_interval, else 3600].",
)
@click.option(
    "--backoff-base", type=Seconds(0, DAY), default=30.0, show_default=True,
    help="Seconds before the first retry after a transient failure (doubles per failure).",
)
@click.option(
    "--timeout", type=Seconds(0, 3600, min_open=True), default=10.0, show_default=True,
    help="HTTP timeout in seconds.",
)
@store_options
def refresh_worker(
    store: StoreTarget,
    once: bool,
    interval: float,
    token_url: str,
    validate_url: str,
    client_id: str | None,
    client_secret: str | None,
    validate_interval: float | None,
    backoff_base: float,
    timeout: float,
) -> None:
    """Refresh tokens before they expire and validate them hourly.

    Tokens expiring within config token_refresh_interval seconds are refreshed
    (one process per token at a time, so several workers may run); after
    config max_refresh_failures transient failures, or when Twitch rejects the
    refresh token, a token is marked for reauthorisation. SIGTERM or SIGINT
    stop the worker between two tokens; it then prints its counters. The
    store must exist (kissbot init-db): the worker never creates or migrates it.

    \b
    Example:
        export TWITCH_CLIENT_ID=… TWITCH_CLIENT_SECRET=…
        kissbot refresh-worker --db kissbot.db -v
        kissbot refresh-worker --url postgresql+psycopg://kissbot@db/kissbot --once
    """
    if not client_id:
        raise click.ClickException(f"no Twitch client id: set {CLIENT_ID_ENV} or pass --client-id")
    if not client_secret:
        raise click.ClickException(f"no Twitch client secret: set {CLIENT_SECRET_ENV} or pass --client-secret")
    from kissbot.refresh import TokenRefresher

    with store.open(create=False) as mgr, TokenRefresher(
        mgr,
        client_id,
        client_secret,
        token_url=token_url,
        validate_url=validate_url,
        timeout=timeout,
        backoff_base=backoff_base,
        validate_interval=validate_interval,
    ) as refresher:
        if once:
            refresher.cycle()
        else:
            stop = threading.Event()
            previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                refresher.run(stop, interval)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        click.echo(str(refresher.counters))
