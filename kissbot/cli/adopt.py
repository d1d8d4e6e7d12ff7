"""``kissbot adopt``: bring a KissBot v4 database under kissbot's migrations."""

from __future__ import annotations

import click

from kissbot.cli.main import StoreTarget, cli, store_options


def _zone(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    from kissbot.adopt import resolve_zone
    from kissbot.errors import KissbotError

    if value is not None:
        try:
            resolve_zone(value)
        except KissbotError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@cli.command()
@click.option(
    "--assume-tz", metavar="ZONE", callback=_zone,
    help="IANA time zone of the database's naive timestamps (default: this machine's zone).",
)
@click.option("--dry-run", is_flag=True, help="Only report what adoption would do; write nothing.")
@store_options
def adopt(store: StoreTarget, assume_tz: str | None, dry_run: bool) -> None:
    """Adopt a database that KissBot v4 created without migrations.

    Reports every difference from kissbot's baseline schema, backs the file up
    to <db>.backup_YYYYMMDD_HHMMSS, then in one transaction converts naive local
    timestamps to UTC and base64-wrapped tokens to standard Fernet, lowercases
    logins, rebuilds the tables and upgrades to the current schema. Running it
    on an adopted database does nothing.

    \b
    Example:
        kissbot adopt --db kissbot.db --assume-tz Europe/Paris --dry-run
        kissbot adopt --db kissbot.db --assume-tz Europe/Paris
    """
    from kissbot.adopt import adopt as adopt_database
    from kissbot.urls import sqlite_path, to_url
    from kissbot.errors import AdoptionError

    path = sqlite_path(to_url(store.target))
    if path is None:
        raise AdoptionError("adopt works on SQLite files only: give --db PATH")
    report = adopt_database(path, key_file=store.key_file, assume_tz=assume_tz, dry_run=dry_run)
    for line in report.lines():
        click.echo(line)
