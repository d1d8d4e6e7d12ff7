"""The ``kissbot`` command group and the options every command shares.

Commands are a thin layer over the public API: they open a store with
:func:`store_options`, call the library, and print. A :class:`KissbotError`
(or a database error) reaches the user as one line and exit status 1.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from kissbot import __version__
from kissbot.errors import KissbotError


@dataclass(frozen=True)
class StoreTarget:
    """Where a command's store is: a SQLite path or a URL, and the key file."""

    db_path: Path
    url: str | None
    key_file: Path

    @property
    def target(self) -> str:
        """The URL if given, else the SQLite path."""
        return self.url or os.fspath(self.db_path)

    def open(self):  # -> kissbot.DatabaseManager
        """Open the store (creating or migrating it, loading the key)."""
        from kissbot.manager import DatabaseManager

        return DatabaseManager(self.db_path, self.key_file, url=self.url)


class KissbotGroup(click.Group):
    """A group that turns library and database errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return super().invoke(ctx)
        except KissbotError as exc:
            raise click.ClickException(str(exc)) from exc
        except SQLAlchemyError as exc:
            raise click.ClickException(f"database error: {getattr(exc, 'orig', None) or exc}") from exc
        except OSError as exc:
            raise click.ClickException(f"{exc.filename or 'file'}: {exc.strerror}") from exc


def _set_verbosity(_ctx: click.Context, _param: click.Parameter, verbose: int) -> None:
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)-8s %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--db``, ``--url``, ``--key-file`` and ``-v`` to a command; pass a :class:`StoreTarget`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, db_path: Path, url: str | None, key_file: Path, **kwargs: Any) -> Any:
        return fn(*args, store=StoreTarget(db_path, url, key_file), **kwargs)

    options = [
        click.option(
            "--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("kissbot.db"),
            show_default=True, help="SQLite database file.",
        ),
        click.option(
            "--url", envvar="KISSBOT_DB_URL", show_envvar=True,
            help="Database URL instead of --db, e.g. postgresql+psycopg://kissbot@db/kissbot.",
        ),
        click.option(
            "--key-file", type=click.Path(dir_okay=False, path_type=Path), default=Path(".kissbot.key"),
            envvar="KISSBOT_KEY_FILE", show_envvar=True, show_default=True, help="Fernet key file.",
        ),
        click.option(
            "-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity,
            help="Log what happens (-vv for debug).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.group(cls=KissbotGroup)
@click.version_option(__version__, prog_name="kissbot")
def cli() -> None:
    """kissbot: the encrypted OAuth token store shared by Twitch bots.

    \b
    Example:
        kissbot init-db --db kissbot.db
        kissbot stats --json
    """
