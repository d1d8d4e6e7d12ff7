"""``kissbot migrate-yaml`` and ``kissbot import-tio``: plaintext tokens into the encrypted store."""

from __future__ import annotations

from pathlib import Path

import click

from kissbot.cli.main import StoreTarget, cli, echo_json, store_options
from kissbot.errors import InvalidImport
from kissbot.validation import MAX_EXPIRES_IN
from kissbot.importers import (
    TIO_EXPIRES_IN,
    YAML_EXPIRES_IN,
    ImportReport,
    TokenBatch,
    import_tokens,
    read_token_file,
    read_yaml_tokens,
)

_SOURCE = click.Path(dir_okay=False, path_type=Path)


def _run(store: StoreTarget, batch: TokenBatch, as_json: bool, **options: object) -> None:
    try:
        report = import_tokens(batch, db_path=store.db_path, key_file=store.key_file, url=store.target if store.url else None, **options)
    except InvalidImport as exc:
        for problem in exc.problems:
            click.echo(f"Error: {problem}", err=True)
        raise click.exceptions.Exit(1) from None
    _print_report(report, as_json)


def _print_report(report: ImportReport, as_json: bool) -> None:
    if as_json:
        echo_json(report.as_dict())
        return
    if report.dry_run:
        click.echo("Dry run: nothing was written.")
    if report.backup:
        click.echo(f"Backup: {report.backup}")
    for note in report.notes:
        click.echo(f"Note: {note}")
    click.echo(f"users_created: {report.users_created}")
    click.echo(f"users_updated: {report.users_updated}")
    click.echo(f"tokens_stored: {report.tokens_stored}")
    click.echo(f"errors: {len(report.errors)}")
    for error in report.errors:
        click.echo(f"  - {error}")


@cli.command("migrate-yaml")
@click.argument("config", type=_SOURCE)
@click.option("--dry-run", is_flag=True, help="Report what would be done; write nothing (no database, key or backup).")
@click.option("--no-backup", is_flag=True, help="Do not back up an existing SQLite database first.")
@click.option("--skip-invalid", is_flag=True, help="Migrate the valid entries and report the invalid ones.")
@click.option(
    "--expires-in", type=click.IntRange(0, MAX_EXPIRES_IN), default=YAML_EXPIRES_IN, show_default=True, metavar="SECONDS",
    help="Lifetime to record for the tokens (0: due for refresh now, as their age is unknown).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@store_options
def migrate_yaml(
    store: StoreTarget, config: Path, dry_run: bool, no_backup: bool, skip_invalid: bool, expires_in: int, as_json: bool
) -> None:
    """Move the tokens of a bot's config.yaml (twitch.tokens) into the store.

    Each twitch.tokens.<login> needs user_id, access_token and refresh_token
    (scopes optional). Every entry is checked first: any invalid entry aborts
    the run with one line per problem and nothing written, unless
    --skip-invalid. The run is one transaction, after a backup
    <db>.backup_YYYYMMDD_HHMMSS of an existing SQLite database. Running it
    again reports the users as updated.

    \b
    Example:
        kissbot migrate-yaml config/config.yaml --dry-run
        kissbot migrate-yaml config/config.yaml --db kissbot.db
    """
    batch = read_yaml_tokens(config)
    _run(
        store, batch, as_json,
        expires_in=expires_in, skip_invalid=skip_invalid, dry_run=dry_run, backup=not no_backup,
    )


@cli.command("import-tio")
@click.argument("file", type=_SOURCE)
@click.option(
    "--expires-in", type=click.IntRange(0, MAX_EXPIRES_IN), default=TIO_EXPIRES_IN, show_default=True, metavar="SECONDS",
    help="Lifetime to record for the tokens.",
)
@click.option("--login", help="The user of a pyTwitchAPI user_token.json (TwitchIO's file names users by id).")
@click.option("--dry-run", is_flag=True, help="Report what would be done; write nothing.")
@click.option("--no-backup", is_flag=True, help="Do not back up the SQLite database first.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@store_options
def import_tio(
    store: StoreTarget, file: Path, expires_in: int, login: str | None, dry_run: bool, no_backup: bool, as_json: bool
) -> None:
    """Import live tokens from TwitchIO's .tio.tokens.json into existing users.

    Users are matched by Twitch user id; ids with no user in the store are
    reported and skipped, never guessed. A pyTwitchAPI user_token.json
    ({"token", "refresh"}) is imported for the user named by --login.
    A malformed entry aborts the run with nothing written.

    \b
    Example:
        kissbot import-tio .tio.tokens.json --dry-run
        kissbot import-tio user_token.json --login serda_bot
    """
    batch = read_token_file(file, login=login)
    _run(store, batch, as_json, expires_in=expires_in, dry_run=dry_run, backup=not no_backup)
