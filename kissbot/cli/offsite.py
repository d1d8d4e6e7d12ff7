"""Off-site backups: ``backups list``, and the bodies of ``backup --to`` and ``restore --from``."""

from __future__ import annotations

import signal
import sys
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

import click

from kissbot.cli.main import StoreTarget, cli, echo_json, refuse_store_options_before
from kissbot.validation import MAX_DAYS

if TYPE_CHECKING:
    from kissbot.offsite import BackupInfo

MAX_KEEP = 100_000
"""Most backups ``--keep-last`` keeps."""


class IntervalType(click.ParamType):
    """``--every``: 30s, 15m, 1h, 1d."""

    name = "INTERVAL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from kissbot.offsite import parse_interval

        if not isinstance(value, str):
            return value
        try:
            return parse_interval(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class TimeType(click.ParamType):
    """``--at``: an ISO 8601 time, UTC unless it names a zone."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from kissbot.offsite import parse_time

        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def offsite_backup_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``backup``'s ``--to``, ``--every`` and ``--keep-*`` options."""
    options = [
        click.option("--to", "to", metavar="URL", help="Upload to a folder, file://… or s3://bucket/prefix instead."),
        click.option("--every", type=IntervalType(), help="With --to: back up every INTERVAL (30s, 15m, 1h, 1d) until SIGTERM."),
        click.option(
            "--keep-last", "--keep", "keep_last", type=click.IntRange(1, MAX_KEEP),
            help="Keep the newest N backups (without --to: kissbot's own <db>.backup_* files beside the new one).",
        ),
        click.option(
            "--keep-daily", type=click.IntRange(1, MAX_DAYS), help="With --to: keep the newest backup of each of the last D days."
        ),
        click.option(
            "--keep-weekly", type=click.IntRange(1, MAX_DAYS // 7),
            help="With --to: keep the newest backup of each of the last W weeks.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def offsite_restore_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``restore``'s ``--from`` and ``--at`` options."""
    fn = click.option("--at", type=TimeType(), help="With --from: the newest backup taken at or before TIME (UTC unless given).")(fn)
    return click.option("--from", "from_url", metavar="URL", help="Restore the newest backup in a folder, file://… or s3://bucket/prefix.")(fn)


def offsite_backup(
    store: StoreTarget, dest: Any, with_key: bool, *, to: str | None, every: Any,
    keep_last: int | None, keep_daily: int | None, keep_weekly: int | None,
) -> bool:
    """Run ``backup --to`` if asked; False for a local backup. Usage errors for options that do not go together."""
    if to is None:
        if every is not None or keep_daily or keep_weekly:
            raise click.UsageError("--every, --keep-daily and --keep-weekly need --to URL")
        return False
    if dest is not None:
        raise click.UsageError("give DEST or --to URL, not both")
    if with_key:
        raise click.UsageError("--with-key cannot be used with --to: the key is never uploaded; keep it apart")
    backup_offsite(store, to, every, (keep_last, keep_daily, keep_weekly))
    return True


def offsite_restore(store: StoreTarget, backup_file: Any, *, from_url: str | None, at: datetime | None) -> bool:
    """Run ``restore --from`` if asked; False for a local restore."""
    if from_url is None:
        if at is not None:
            raise click.UsageError("--at needs --from URL")
        if backup_file is None:
            raise click.UsageError("give BACKUP or --from URL")
        return False
    if backup_file is not None:
        raise click.UsageError("give BACKUP or --from URL, not both")
    restore_offsite(store, from_url, at)
    return True


def _when(backup: BackupInfo) -> str:
    return f"{backup.created_at:%Y-%m-%d %H:%M:%S} UTC"


def _echo_run(info: BackupInfo | None, gone: list[BackupInfo], error: Exception | None, to: str) -> None:
    if error is not None:
        click.echo(f"Error: {error}", err=True)
        return
    assert info is not None
    click.echo(f"Uploaded {info.name} ({info.size} bytes, revision {info.revision}) to {to}")
    for backup in gone:
        click.echo(f"Pruned {backup.name}")


def backup_offsite(store: StoreTarget, to: str, every: Any, keep: tuple[int | None, int | None, int | None]) -> None:
    """``kissbot backup --to URL [--every INTERVAL] [--keep-last N] [--keep-daily D] [--keep-weekly W]``."""
    from kissbot.offsite import Retention, backup_to, prune_backups, run_every

    retention = Retention(*(n or 0 for n in keep))
    if every is None:
        info = backup_to(store.target, to)
        _echo_run(info, prune_backups(to, retention) if retention else [], None, to)
        return
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        click.echo(f"Received {signal.Signals(signum).name}: stopping after the current backup", err=True)
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ok = run_every(
            store.target, to, every, retention, stop,
            lambda info, gone, error: (_echo_run(info, gone, error, to), sys.stdout.flush()),
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("Stopped")
    if not ok:
        sys.exit(1)


def restore_offsite(store: StoreTarget, url: str, at: datetime | None) -> None:
    """``kissbot restore --from URL [--at TIME]``."""
    from pathlib import Path

    from kissbot.crypto import TokenCipher, read_key_ring
    from kissbot.urls import to_url
    from kissbot.offsite import restore_from

    cipher = TokenCipher(read_key_ring(store.key_file))
    report = restore_from(url, store.target, cipher, at=at, previous_dir=Path.cwd())
    if report.previous_backup is not None:
        click.echo(f"Backed up the current database to {report.previous_backup}")
    click.echo(
        f"Restored {to_url(store.url).render_as_string(hide_password=True) if store.url else store.db_path} from {url.rstrip('/')}/{report.backup.name} "
        f"(taken {_when(report.backup)}, revision {report.backup.revision}; "
        f"tokens of {report.tokens_checked} users decrypt with {store.key_file})"
    )


@cli.group()
def backups() -> None:
    """List the off-site backups at a destination.

    \b
    Example:
        kissbot backups list s3://my-bucket/kissbot
    """


@backups.command("list")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backups_list(url: str, as_json: bool) -> None:
    """List the complete backups in URL (a folder, file://, or s3://bucket/prefix), oldest first.

    Each line: the UTC time it was taken, its size, the store's migration, the
    backend and the object's name. Uploads that never completed are not listed.

    \b
    Example:
        kissbot backups list s3://my-bucket/kissbot
        kissbot backups list /mnt/backups/kissbot --json
    """
    from kissbot.offsite import list_backups

    refuse_store_options_before(click.get_current_context(), "backups list", "it lists the backups at its URL argument")
    found = list_backups(url)
    if as_json:
        echo_json([
            {"name": b.name, "created_at": b.created_at, "size": b.size, "revision": b.revision, "backend": b.backend}
            for b in found
        ])
        return
    if not found:
        click.echo(f"No backups in {url}")
        return
    for b in found:
        click.echo(f"{_when(b)}  {b.size:>12} bytes  revision {b.revision}  {b.backend:<10}  {b.name}")
