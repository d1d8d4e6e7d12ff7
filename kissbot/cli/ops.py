"""Day-to-day operations: ``cleanup-logs``, ``backup``, ``restore``, ``maintenance``, ``doctor``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kissbot.cli.main import StoreTarget, cli, echo_json, store_options
from kissbot.cli.offsite import offsite_backup, offsite_backup_options, offsite_restore, offsite_restore_options
from kissbot.errors import BackupError, DatabaseError, UnsupportedBackend
from kissbot.validation import MAX_DAYS


def _sqlite_file(store: StoreTarget, command: str, postgres_tool: str) -> Path:
    from kissbot.urls import sqlite_path, to_url

    url = to_url(store.target)
    path = sqlite_path(url)
    if path is None:
        if url.get_backend_name() == "postgresql":
            raise UnsupportedBackend(f"`kissbot {command}` works on SQLite files; for PostgreSQL use {postgres_tool}")
        raise DatabaseError(f"`kissbot {command}` needs a SQLite database file")
    return path


@cli.command("cleanup-logs")
@click.option("--days", type=click.IntRange(0, MAX_DAYS), help="Keep this many days (default: config log_retention_days).")
@store_options
def cleanup_logs(store: StoreTarget, days: int | None) -> None:
    """Delete audit log entries older than N days and print how many went.

    \b
    Example:
        kissbot cleanup-logs --db kissbot.db --days 30
    """
    from kissbot.settings import SETTINGS

    with store.open(create=False, need_key=False) as mgr:
        if days is None:
            days = mgr.get_config("log_retention_days", default=SETTINGS["log_retention_days"].default)
        deleted = mgr.cleanup_old_logs(days)
    click.echo(f"Deleted {deleted} audit log entries older than {days} days")


@cli.command()
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@click.option("--with-key", is_flag=True, help="Also copy the key beside the backup as DEST.key (mode 0600).")
@offsite_backup_options
@store_options
def backup(store: StoreTarget, dest: Path | None, with_key: bool, **offsite: Any) -> None:
    """Copy the live SQLite database consistently to DEST while bots keep writing.

    DEST defaults to <db>.backup_YYYYMMDD_HHMMSS (UTC) beside the database; a
    folder gets that name inside it. The copy is checked with integrity_check
    and has mode 0600. The key is not copied unless --with-key. --keep N then
    deletes all but the N newest backups of this database that kissbot made
    in that folder (named <db>.backup_YYYYMMDD_HHMMSS, mode 0600; nothing
    else, not the key copies).

    With --to URL (a folder, file:// or s3://bucket/prefix; SQLite or
    PostgreSQL) the snapshot is compressed and uploaded instead, never the key;
    --every repeats it until SIGTERM, --keep-* prune older backups after each
    success (see `kissbot backups list`).

    \b
    Example:
        kissbot backup --db kissbot.db
        kissbot backup --db kissbot.db /mnt/backups/ --keep 7
        kissbot backup --db kissbot.db --to s3://my-bucket/kissbot --every 1h --keep-last 24 --keep-daily 7
    """
    if offsite_backup(store, dest, with_key, **offsite):
        return
    from kissbot.backup import backup_key, backup_sqlite, default_backup_path, prune_backups
    from kissbot.crypto import read_key_ring

    db = _sqlite_file(store, "backup", "pg_dump, e.g. `pg_dump -Fc -f kissbot.dump DBNAME`")
    if dest is None:
        dest = default_backup_path(db)
    elif dest.is_dir():
        dest = dest / default_backup_path(db).name
    if with_key:
        read_key_ring(store.key_file)  # a missing key fails before anything is written
    backup_sqlite(db, dest)
    click.echo(f"Backed up {db} to {dest} (integrity_check: ok)")
    if with_key:
        key_copy = backup_key(store.key_file, dest)
        click.echo(f"Copied the key to {key_copy}")
        click.echo(
            f"Warning: {key_copy} decrypts every token in {dest}; store the two apart, or both somewhere only you can read",
            err=True,
        )
    if offsite["keep_last"] is not None:
        for gone in prune_backups(db, dest.parent, offsite["keep_last"]):
            click.echo(f"Pruned {gone}")


@cli.command()
@click.argument("backup_file", metavar="BACKUP", required=False, type=click.Path(path_type=Path))
@offsite_restore_options
@store_options
def restore(store: StoreTarget, backup_file: Path | None, **offsite: Any) -> None:
    """Replace the SQLite database with BACKUP, after checking it thoroughly.

    BACKUP is refused if it fails integrity_check, is not a kissbot database,
    is at a migration this version does not know, or holds tokens the current
    key cannot decrypt. Stop every bot first: restore refuses a database in
    use. The current database is backed up (<db>.backup_YYYYMMDD_HHMMSS) and
    then replaced atomically.

    With --from URL instead of BACKUP, the newest off-site backup there (or the
    newest taken at or before --at TIME) is downloaded, checked against its
    manifest's SHA-256 and restored the same way (PostgreSQL: pg_restore in one
    transaction, after a pg_dump of the current database).

    \b
    Example:
        kissbot restore --db kissbot.db kissbot.db.backup_20251105_004608
        kissbot restore --db kissbot.db --from s3://my-bucket/kissbot --at 2026-11-29T08:00Z
    """
    if offsite_restore(store, backup_file, **offsite):
        return
    assert backup_file is not None
    from kissbot.backup import restore_sqlite
    from kissbot.crypto import TokenCipher, read_key_ring

    db = _sqlite_file(store, "restore", "pg_restore")
    if not backup_file.is_file():  # before the key: a mistyped BACKUP is the error to report
        raise BackupError(f"backup {backup_file} not found")
    cipher = TokenCipher(read_key_ring(store.key_file))
    report = restore_sqlite(backup_file, db, cipher)
    if report.previous_backup is not None:
        click.echo(f"Backed up the current database to {report.previous_backup}")
    click.echo(f"Restored {db} from {backup_file} (tokens of {report.tokens_checked} users decrypt with {store.key_file})")


@cli.group()
def maintenance() -> None:
    """Compact, analyze, checkpoint or check the database.

    \b
    Example:
        kissbot maintenance checkpoint --db kissbot.db --mode TRUNCATE
        kissbot maintenance vacuum --db kissbot.db
    """


@maintenance.command("vacuum")
@store_options
def maintenance_vacuum(store: StoreTarget) -> None:
    """Rebuild the database to reclaim free space (VACUUM).

    \b
    Example:
        kissbot maintenance vacuum --db kissbot.db
    """
    from kissbot.maintenance import open_existing, vacuum

    engine = open_existing(store.target)
    try:
        vacuum(engine)
    finally:
        engine.dispose()
    click.echo("VACUUM: done")


@maintenance.command("analyze")
@store_options
def maintenance_analyze(store: StoreTarget) -> None:
    """Refresh the query planner's statistics (ANALYZE).

    \b
    Example:
        kissbot maintenance analyze --db kissbot.db
    """
    from kissbot.maintenance import analyze, open_existing

    engine = open_existing(store.target)
    try:
        analyze(engine)
    finally:
        engine.dispose()
    click.echo("ANALYZE: done")


@maintenance.command("checkpoint")
@click.option(
    "--mode", type=click.Choice(["PASSIVE", "FULL", "RESTART", "TRUNCATE"], case_sensitive=False),
    default="PASSIVE", show_default=True, help="TRUNCATE also empties the -wal file.",
)
@store_options
def maintenance_checkpoint(store: StoreTarget, mode: str) -> None:
    """Copy the WAL back into the database file (PRAGMA wal_checkpoint); SQLite only.

    \b
    Example:
        kissbot maintenance checkpoint --db kissbot.db --mode TRUNCATE
    """
    from kissbot.maintenance import checkpoint, open_existing

    _sqlite_file(store, "maintenance checkpoint", "nothing: PostgreSQL checkpoints by itself")
    engine = open_existing(store.target)
    try:
        result = checkpoint(engine, mode)
    finally:
        engine.dispose()
    mode, done, log = mode.upper(), result.checkpointed_frames, result.log_frames
    if result.busy:
        click.echo(f"Checkpoint ({mode}) not finished: another connection was busy; {done} of {log} WAL pages copied, "
                   "run it again later")
    elif mode == "TRUNCATE":  # SQLite reports 0 pages once the -wal file is emptied
        click.echo("Checkpoint (TRUNCATE): the WAL is copied into the database and emptied")
    elif log == 0:
        click.echo(f"Checkpoint ({mode}): the WAL is empty, nothing to copy")
    else:
        click.echo(f"Checkpoint ({mode}): {done} of {log} WAL pages copied into the database")


@maintenance.command("integrity")
@store_options
def maintenance_integrity(store: StoreTarget) -> None:
    """Check every page and index (PRAGMA integrity_check); SQLite only. Exit 1 on a problem.

    \b
    Example:
        kissbot maintenance integrity --db kissbot.db
    """
    from kissbot.maintenance import integrity_check, open_existing

    _sqlite_file(store, "maintenance integrity", "`amcheck` or pg_dump to a scratch file")
    engine = open_existing(store.target, read_only=True)
    try:
        problems = integrity_check(engine)
    finally:
        engine.dispose()
    if problems:
        raise click.ClickException(f"integrity_check found {len(problems)} problems, first: {problems[0]}")
    click.echo("integrity_check: ok")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@store_options
def doctor(store: StoreTarget, as_json: bool) -> None:
    """Diagnose the store: key file, decryption, WAL, migration, integrity, tokens, instances.

    Prints one line per finding with its fix; exits 1 if any is an error.
    Creates and changes nothing.

    \b
    Example:
        kissbot doctor --db kissbot.db --key-file .kissbot.key
    """
    from kissbot.doctor import diagnose

    findings = diagnose(store.target, store.key_file)
    if as_json:
        echo_json([f.as_dict() for f in findings])
    else:
        for f in findings:
            click.echo(f"[{f.level}] {f.message}" + (f"; fix: {f.fix}" if f.fix else ""))
    if any(f.level == "error" for f in findings):
        click.get_current_context().exit(1)
