"""``kissbot metrics`` and ``kissbot metrics serve``: the store's Prometheus metrics."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from kissbot.cli.main import StoreTarget, cli, store_options


def need_prometheus() -> None:
    """Fail with one line if prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "kissbot metrics needs prometheus-client: pip install 'kissbot[metrics]'"
        ) from None


@contextmanager
def serving(registry: Any, host: str, port: int, what: str) -> Iterator[Any]:
    """Serve ``registry`` on http://HOST:PORT/metrics from a thread while the block runs (saying where on stderr)."""
    from kissbot.metrics import serve

    try:
        server = serve(registry, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"Serving {what} on http://{host}:{server.server_port}/metrics", err=True)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def refresh_metrics():  # -> kissbot.metrics.RefreshMetrics
    """The refresh worker's metrics (``refresh-worker --metrics-port``)."""
    need_prometheus()
    from kissbot.metrics import RefreshMetrics

    return RefreshMetrics()


def _registry(store: StoreTarget, max_channels: int):  # -> (CollectorRegistry, Engine)
    need_prometheus()
    from kissbot.metrics import open_engine, store_registry

    engine = open_engine(store.target)
    return store_registry(engine, max_channels=max_channels), engine


_max_channels = click.option(
    "--max-channels", type=click.IntRange(1, 10_000), default=100, show_default=True,
    help="Heartbeat age series for at most this many channels (the silent longest first).",
)


@cli.group(invoke_without_command=True)
@_max_channels
@store_options
@click.pass_context
def metrics(ctx: click.Context, store: StoreTarget, max_channels: int) -> None:
    """Print the store's Prometheus metrics once (for node_exporter's textfile collector).

    Reads the store without its key: no token or key material is exposed.
    `kissbot metrics serve` serves the same on /metrics.

    \b
    Example:
        kissbot metrics --db kissbot.db > /var/lib/node_exporter/kissbot.prom.$$ && \\
          mv /var/lib/node_exporter/kissbot.prom.$$ /var/lib/node_exporter/kissbot.prom
    """
    if ctx.invoked_subcommand is not None:
        return
    from kissbot.metrics import render

    registry, engine = _registry(store, max_channels)
    try:
        click.echo(render(registry), nl=False)
    finally:
        engine.dispose()


@metrics.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9464, show_default=True, help="Port to listen on (0: any free port)."
)
@_max_channels
@store_options
def serve(store: StoreTarget, host: str, port: int, max_channels: int) -> None:
    """Serve the store's Prometheus metrics on http://HOST:PORT/metrics until SIGTERM or Ctrl-C.

    Each scrape reads the store afresh; no key is needed or read.

    \b
    Example:
        kissbot metrics serve --db kissbot.db --host 0.0.0.0 --port 9464
    """
    registry, engine = _registry(store, max_channels)
    stop = threading.Event()
    try:
        with serving(registry, host, port, "kissbot metrics"):
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    finally:
        engine.dispose()
