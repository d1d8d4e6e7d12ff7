"""``kissbot copy``: copy a whole store into another, empty, database."""

from __future__ import annotations

from pathlib import Path

import click

from kissbot.cli.main import cli, refuse_store_options_before


@cli.command("copy")
@click.option(
    "--from", "source", envvar="KISSBOT_DB_URL", show_envvar=True, default="kissbot.db", show_default=True,
    help="Store to copy: a database URL or a SQLite file.",
)
@click.option("--to", "target", required=True, help="Empty database to fill: a URL or a SQLite file.")
@click.option(
    "--key-file", type=click.Path(dir_okay=False, path_type=Path), envvar="KISSBOT_KEY_FILE", show_envvar=True,
    help="The store's Fernet key, used to check that every copied token decrypts "
    "[default: .kissbot.key beside a --from file, else in the current directory].",
)
def copy_command(source: str, target: str, key_file: Path | None) -> None:
    """Copy every table of a store into an empty database, in one transaction.

    The target is created or migrated to the current schema, filled with the
    rows as stored (tokens stay encrypted with the same key), its id sequences
    are moved past the copied ids, then row counts are compared and every token
    is decrypted with the key before the copy is committed. A target that
    already holds kissbot rows is refused and left untouched.

    \b
    Example:
        kissbot copy --from sqlite:///kissbot.db --to postgresql+psycopg://kissbot@db/kissbot
    """
    from kissbot.copy import copy_store
    from kissbot.crypto import TokenCipher, read_key_ring
    from kissbot.keys import default_key_file

    refuse_store_options_before(click.get_current_context(), "copy", "use kissbot copy --from STORE --to TARGET [--key-file KEY]")
    key_file = key_file or default_key_file(source)
    report = copy_store(source, target, TokenCipher(read_key_ring(key_file)))
    click.echo(f"Copied {report.source} → {report.target}")
    for table, count in report.counts.items():
        click.echo(f"  {table}: {count}")
    click.echo(f"✅ Row counts match; {report.tokens_verified} token rows decrypt with {key_file}")
