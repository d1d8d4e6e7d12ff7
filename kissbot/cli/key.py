"""``kissbot key``: status, rotate, retire and reset the store's encryption key."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.engine import Engine

from kissbot.cli.main import StoreTarget, cli, echo_json, store_options
from kissbot.crypto import MAX_KEY_VERSION
from kissbot.keys import (
    MAX_BATCH_SIZE,
    ROTATE_BATCH_SIZE,
    KeySource,
    key_status,
    pending_rotation,
    reset_keys,
    resolve_key_source,
    retire_key,
    rotate_keys,
    token_holders,
    writable_key_file,
)

@contextmanager
def _open(store: StoreTarget, create: bool = True) -> Iterator[tuple[Engine, KeySource, str]]:
    # The store's engine without a key: these commands must work when the key is wrong or lost.
    from kissbot.engine import create_engine
    from kissbot.urls import sqlite_path, to_url
    from kissbot.migrations import ensure_schema

    url = to_url(store.target)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise click.ClickException(f"database {path} not found")
    source = resolve_key_source(key_file=store.key_file)
    engine = create_engine(url)
    try:
        ensure_schema(engine, create=create)
        yield engine, source, url.database or "the store"
    finally:
        engine.dispose()


@cli.group()
def key() -> None:
    """Inspect and rotate the key that encrypts the tokens.

    \b
    Example:
        kissbot key status --db kissbot.db
        kissbot key rotate --db kissbot.db
        kissbot key retire 1 --db kissbot.db
    """


@key.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@store_options
def status(store: StoreTarget, as_json: bool) -> None:
    """Show key versions, fingerprints and token rows per version.

    Fingerprints identify keys without revealing them. Problems (a wrong or
    missing key) are listed and make the exit status 1.

    \b
    Example:
        kissbot key status --db kissbot.db --json
    """
    with _open(store, create=False) as (engine, source, db):
        report = key_status(engine, source, db)
    if as_json:
        echo_json(report.as_dict())
    else:
        click.echo(f"Key source: {report.source}")
        click.echo(f"Store key version: {report.encryption_key_version}")
        click.echo(f"{'VERSION':<9}{'FINGERPRINT':<18}{'RECORDED':<18}ROWS")
        for v in report.versions:
            click.echo(
                f"{'v%d' % v.version:<9}{v.fingerprint or '-':<18}{v.recorded_fingerprint or '-':<18}{v.rows}"
                + ("  (primary)" if v.primary else "")
            )
        for problem in report.problems:
            click.echo(f"Problem: {problem}", err=True)
    if report.problems:
        click.get_current_context().exit(1)


@key.command()
@click.option(
    "--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=ROTATE_BATCH_SIZE, show_default=True,
    help="Token rows re-encrypted per transaction.",
)
@store_options
def rotate(store: StoreTarget, batch_size: int) -> None:
    """Add a new key version and re-encrypt every token with it.

    The new key is written to the key file (old versions kept) before any
    token is touched. Safe to interrupt: run it again and it resumes. Bots
    keep running and pick up the new key. Retire the old version afterwards.

    \b
    Example:
        kissbot key rotate --db kissbot.db
        kissbot key retire 1 --db kissbot.db
    """
    with _open(store) as (engine, source, db):
        writable_key_file(source, "rotate keys")
        target, total = pending_rotation(engine, source)
        label = f"Re-encrypting with key v{target}"
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            result = rotate_keys(engine, source, db=db, batch_size=batch_size, progress=bar.update)
    verb = "Resumed rotation to" if result.resumed else "Rotated to"
    click.echo(f"{verb} key version {result.to_version} ({result.fingerprint}): {result.rows} token rows re-encrypted")


@key.command()
@click.argument("version", type=click.IntRange(1, MAX_KEY_VERSION))
@store_options
def retire(store: StoreTarget, version: int) -> None:
    """Remove an old key version from the key file.

    Refused while any token row still uses that version (rotate first) and
    for the newest version.

    \b
    Example:
        kissbot key retire 1 --db kissbot.db
    """
    with _open(store) as (engine, source, db):
        fp = retire_key(engine, source, version, db=db)
    click.echo(f"Retired key version {version} ({fp}) from {source.path}")


@key.command()
@click.option("--yes", is_flag=True, help="Really delete every token.")
@store_options
def reset(store: StoreTarget, yes: bool) -> None:
    """Delete every stored token and start over with a new key.

    For a lost or leaked key: every user must authorise again. Refused
    without --yes.

    \b
    Example:
        kissbot key reset --db kissbot.db --yes
    """
    with _open(store) as (engine, source, _db):
        path = writable_key_file(source, "reset the key")
        if not yes:
            users, rows = token_holders(engine)
            raise click.ClickException(
                f"this deletes {rows} token rows of {users} users and replaces key file {path}: "
                "run again with --yes"
            )
        result = reset_keys(engine, source)
    click.echo(
        f"Deleted {result.tokens_deleted} token rows of {result.users} users; "
        f"new key version {result.version} ({result.fingerprint}) in {path}"
    )
