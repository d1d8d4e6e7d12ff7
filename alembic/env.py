"""Alembic environment of kissbot.

Uses the connection passed in ``config.attributes["connection"]`` when there is
one (the library, the CLI and the tests do this); otherwise builds the engine
with kissbot's own helper from ``KISSBOT_DB_URL`` or ``sqlalchemy.url``.
"""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.pool import NullPool

from kissbot.engine import create_engine
from kissbot.migrations import migration_connection
from kissbot.models import metadata
from kissbot.types import EncryptedString, UTCDateTime

config = context.config
target_metadata = metadata
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)  # the `alembic` command's own output


def render_item(type_, obj, autogen_context):
    """Render kissbot's column types as plain SQLAlchemy types in new scripts."""
    if type_ == "type" and isinstance(obj, EncryptedString):
        return "sa.Text()"
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _url() -> str:
    return os.environ.get("KISSBOT_DB_URL") or config.get_main_option("sqlalchemy.url") or "sqlite:///kissbot.db"


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        render_item=render_item,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=NullPool)
    try:
        with migration_connection(engine) as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
