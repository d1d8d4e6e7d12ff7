"""``kissbot refresh-worker``: keep every stored token fresh (see :mod:`kissbot.refresh`)."""

from __future__ import annotations

import gc
import signal
import threading
from contextlib import nullcontext

import click

from kissbot.cli.main import Seconds, StoreTarget, cli, store_options
from kissbot.cli.twitch import client_options
from kissbot.twitch import (
    CLIENT_ID_ENV,
    DEFAULT_TOKEN_URL,
    DEFAULT_VALIDATE_URL,
    TOKEN_URL_ENV,
    VALIDATE_URL_ENV,
)

DAY = 24 * 3600
MAX_INTERVAL = 10**10
"""Longest validation interval, in seconds (~300 years, "never"): dates computed from it stay representable."""
DEFAULT_CONCURRENCY = 32  # kissbot.refresh.DEFAULT_CONCURRENCY (not imported: it pulls httpx in)
MAX_CONCURRENCY = 256  # kissbot.refresh.MAX_CONCURRENCY


class Concurrency(click.ParamType):
    """A whole number of tokens at once, 1 to MAX_CONCURRENCY; anything else is one line and exit status 1."""

    name = "N"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = int(str(value).strip(), 10)
        except ValueError:
            number = 0
        if not 1 <= number <= MAX_CONCURRENCY or str(number) != str(value).strip():
            raise click.ClickException(f"--concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {value!r}")
        return number


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
@client_options
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
@click.option(
    "--concurrency", type=Concurrency(), default=DEFAULT_CONCURRENCY, show_default=True,
    help=f"Tokens refreshed or validated at once (1-{MAX_CONCURRENCY}).",
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535),
    help="Serve the worker's Prometheus metrics on this port (0: any free port; needs kissbot[metrics]).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of --metrics-port.")
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
    concurrency: int,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Refresh tokens before they expire and validate them hourly.

    Tokens expiring within config token_refresh_interval seconds are refreshed,
    --concurrency of them at once; several workers may run: they split the due
    tokens, each refreshed by one process at a time. A 429 from Twitch pauses
    every request until its rate limit resets. After
    config max_refresh_failures transient failures, or when Twitch rejects the
    refresh token, a token is marked for reauthorisation. SIGTERM or SIGINT
    stop the worker between two tokens; it then prints its counters. The
    store must exist (kissbot init-db): the worker never creates or migrates it.

    \b
    Example:
        export TWITCH_CLIENT_ID=… TWITCH_CLIENT_SECRET=…
        kissbot refresh-worker --db kissbot.db -v --concurrency 64
        kissbot refresh-worker --url postgresql+psycopg://kissbot@db/kissbot --once
        kissbot refresh-worker --db kissbot.db --metrics-port 9465   # Prometheus metrics
    """
    if not client_id:
        raise click.ClickException(f"no Twitch client id: set {CLIENT_ID_ENV} or pass --client-id")
    from kissbot.refresh import TokenRefresher

    observer = metrics = None
    if metrics_port is not None:
        from kissbot.cli.metrics import refresh_metrics, serving

        observer = refresh_metrics()
        metrics = serving(observer.registry, metrics_host, metrics_port, "refresh worker metrics")
    with metrics or nullcontext(), store.open(create=False) as mgr, TokenRefresher(
        mgr,
        client_id,
        client_secret,
        token_url=token_url,
        validate_url=validate_url,
        timeout=timeout,
        backoff_base=backoff_base,
        validate_interval=validate_interval,
        concurrency=concurrency,
        observer=observer,
    ) as refresher:
        # What start-up made (modules, the engine, the HTTP client) lives as long as the process: frozen, it is
        # left out of the collector's full passes, during the work and at exit (0.3-1 s of a --once run, measured).
        gc.freeze()
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
