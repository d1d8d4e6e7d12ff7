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
    read_yaml_tokens,
)
from kissbot.live_tokens import read_live_tokens
from kissbot.repo import TOKEN_TYPES
from kissbot.twitch import DEFAULT_VALIDATE_URL, VALIDATE_URL_ENV

_SOURCE = click.Path(dir_okay=False, path_type=Path)


def _run(store: StoreTarget, batch: TokenBatch, as_json: bool, **options: object) -> ImportReport:
    try:
        report = import_tokens(batch, db_path=store.db_path, key_file=store.key_file, url=store.target if store.url else None, **options)
    except InvalidImport as exc:
        for problem in exc.problems:
            click.echo(f"Error: {problem}", err=True)
        raise click.exceptions.Exit(1) from None
    _print_report(report, as_json)
    return report


def _print_report(report: ImportReport, as_json: bool) -> None:
    if as_json:
        echo_json(report.as_dict())
        return
    if report.dry_run:
        click.echo("Dry run: nothing was written.")
        for login, action in report.logins.items():
            click.echo(f"would {action} {login}")
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
    "--bot", metavar="LOGIN",
    help="The bot account's login [default: the config's bot.name, else the user whose id is twitch.bot_id].",
)
@click.option(
    "--expires-in", type=click.IntRange(0, MAX_EXPIRES_IN), default=YAML_EXPIRES_IN, show_default=True, metavar="SECONDS",
    help="Lifetime to record for the tokens (0: due for refresh now, as their age is unknown).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@store_options
def migrate_yaml(
    store: StoreTarget,
    config: Path,
    dry_run: bool,
    no_backup: bool,
    skip_invalid: bool,
    bot: str | None,
    expires_in: int,
    as_json: bool,
) -> None:
    """Move the tokens of a bot's config.yaml (twitch.tokens) into the store.

    Each twitch.tokens.<login> needs user_id, access_token and refresh_token
    (scopes optional). The user named by --bot (else bot.name, else
    twitch.bot_id) is stored as a bot account. Every entry is checked first:
    any invalid entry aborts the run with one line per problem and nothing
    written, unless --skip-invalid; a run that imports nothing exits 1. The
    run is one transaction, after a backup <db>.backup_YYYYMMDD_HHMMSS of an
    existing SQLite database. The dry run lists each login it would create or
    update; running it again reports the users as updated.

    \b
    Example:
        kissbot migrate-yaml config/config.yaml --dry-run
        kissbot migrate-yaml config/config.yaml --db kissbot.db --bot serda_bot
    """
    batch = read_yaml_tokens(config, bot=bot)
    report = _run(
        store, batch, as_json,
        expires_in=expires_in, skip_invalid=skip_invalid, dry_run=dry_run, backup=not no_backup,
    )
    if report.tokens_stored == 0:
        click.echo(f"Error: nothing to migrate from {batch.source}: every entry is invalid (see above)", err=True)
        raise click.exceptions.Exit(1)


@cli.command("import-tio")
@click.argument("file", type=_SOURCE)
@click.option(
    "--expires-in", type=click.IntRange(0, MAX_EXPIRES_IN), default=TIO_EXPIRES_IN, show_default=True, metavar="SECONDS",
    help="Lifetime to record for the tokens.",
)
@click.option("--login", help="The user of a pyTwitchAPI user_token.json (TwitchIO's file names users by id).")
@click.option(
    "--create-users", is_flag=True,
    help="Create missing users, learning each token's login and id with one Twitch /validate call.",
)
@click.option(
    "--token-type", type=click.Choice(TOKEN_TYPES), default="bot", show_default=True,
    help="Store the tokens as the bot's own or as broadcaster tokens.",
)
@click.option("--force", is_flag=True, help="Also import entries whose stored tokens are newer than the file.")
@click.option(
    "--validate-url", envvar=VALIDATE_URL_ENV, default=DEFAULT_VALIDATE_URL, show_default=True,
    help=f"Twitch's validate endpoint, for --create-users (env {VALIDATE_URL_ENV}).",
)
@click.option("--dry-run", is_flag=True, help="Report what would be done; write nothing.")
@click.option("--no-backup", is_flag=True, help="Do not back up the SQLite database first.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@store_options
def import_tio(
    store: StoreTarget,
    file: Path,
    expires_in: int,
    login: str | None,
    create_users: bool,
    token_type: str,
    force: bool,
    validate_url: str,
    dry_run: bool,
    no_backup: bool,
    as_json: bool,
) -> None:
    """Import live tokens from TwitchIO's .tio.tokens.json (or pyTwitchAPI's user_token.json).

    Users are matched by Twitch user id; ids with no user in the store are
    reported and skipped, never guessed, unless --create-users. A pyTwitchAPI
    user_token.json ({"token", "refresh"}) is imported for the user named by
    --login (or the token's own with --create-users). TwitchIO's
    last_validated is kept. An entry whose stored tokens were written after
    the file is skipped (the file is older: importing it would roll the row
    back), unless --force. A malformed entry aborts the run with nothing
    written; a run that imports nothing exits 1.

    \b
    Example:
        kissbot import-tio .tio.tokens.json --create-users --dry-run
        kissbot import-tio user_token.json --login serda_bot
    """
    batch = read_live_tokens(
        file, login=login, create_users=create_users, token_type=token_type, force=force, validate_url=validate_url
    )
    report = _run(store, batch, as_json, expires_in=expires_in, dry_run=dry_run, backup=not no_backup)
    if report.tokens_stored == 0:
        click.echo(f"Error: nothing to import from {file}: every entry was skipped (see above)", err=True)
        raise click.exceptions.Exit(1)
