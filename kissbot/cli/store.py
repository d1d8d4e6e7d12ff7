"""``kissbot init-db`` and ``kissbot stats``."""

from __future__ import annotations


import click

from kissbot.cli.main import StoreTarget, cli, echo_json, store_options


@cli.command("init-db")
@store_options
def init_db(store: StoreTarget) -> None:
    """Create the database (or migrate it) to the current schema.

    \b
    Example:
        kissbot init-db --db kissbot.db
    """
    from sqlalchemy import inspect

    from kissbot.engine import create_engine
    from kissbot.urls import sqlite_path, to_url
    from kissbot.migrations import KISSBOT_TABLES, ensure_schema

    url = to_url(store.target)
    path = sqlite_path(url)
    shown = path if path is not None else url.render_as_string(hide_password=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, synchronous=store.synchronous)
    try:
        if path is not None:  # connecting would turn a database that is then refused into WAL mode
            existed = path.exists()
        else:
            with engine.connect() as conn:
                existed = bool(set(inspect(conn).get_table_names()) & KISSBOT_TABLES)
        click.echo(f"📦 {'Opening' if existed else 'Creating'} database: {shown}")
        ensure_schema(engine)
        with engine.connect() as conn:
            tables = sorted(set(inspect(conn).get_table_names()) & KISSBOT_TABLES)
            if path is not None:
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
                click.echo(f"✅ WAL mode enabled: {mode}")
    finally:
        engine.dispose()
    click.echo(f"✅ Tables {'up to date' if existed else 'created'}: {', '.join(tables)}")
    click.echo(f"✅ Database initialized successfully: {shown}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@store_options
def stats(store: StoreTarget, as_json: bool) -> None:
    """Show counts of users, tokens, instances and audit events, and the size.

    \b
    Example:
        kissbot stats --db kissbot.db --json
    """
    with store.open(create=False, need_key=False) as mgr:
        figures = mgr.get_stats()
    if as_json:
        echo_json(figures)
        return
    click.echo(f"Users: {figures['users_count']}")
    click.echo(f"Tokens: {figures['tokens_count']}")
    click.echo(f"Tokens needing reauth: {figures['tokens_needing_reauth']}")
    click.echo(f"Active instances: {figures['active_instances']}")
    click.echo(f"Audit log entries: {figures['audit_log_count']}")
    click.echo(f"Database size: {figures['db_size_bytes'] / 1024:.1f} KB")
