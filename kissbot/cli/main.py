"""The ``kissbot`` command group and the options every command shares.

Commands are a thin layer over the public API: they open a store with
:func:`store_options`, call the library, and print. A :class:`KissbotError`
(or a database error) reaches the user as one line and exit status 1.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import click

from kissbot import __version__
from kissbot.errors import KissbotError, driver_message
from kissbot.validation import mask_secrets


@dataclass(frozen=True)
class StoreTarget:
    """Where a command's store is: a SQLite path or a URL, and the key file (default: beside the database)."""

    db_path: Path
    url: str | None
    key_file: Path
    synchronous: str | None = None

    def __post_init__(self) -> None:
        if self.key_file is None:
            from kissbot.keys import default_key_file

            object.__setattr__(self, "key_file", default_key_file(self.target))

    @property
    def target(self) -> str:
        """The URL if given (refused unless well formed and supported), else the SQLite path."""
        if not self.url:
            return os.fspath(self.db_path)
        from kissbot.urls import parse_url

        return parse_url(self.url).render_as_string(hide_password=False)

    def open(self, create: bool = True):  # -> kissbot.DatabaseManager
        """Open the store (migrating it, loading the key).

        With ``create`` (the default) a missing database and key file are
        created and an old schema is migrated; read-only commands pass
        ``create=False`` so that a wrong path gives ``Error: database … does
        not exist; create it with kissbot init-db`` instead of a new empty
        store, and an old database is left as it is.
        """
        from kissbot.manager import DatabaseManager

        return DatabaseManager(
            self.db_path, self.key_file, url=self.target if self.url else None, synchronous=self.synchronous, create=create
        )


COMMAND_MODULES = {
    "init-db": "store", "stats": "store",
    "adopt": "adopt",
    "migrate-yaml": "migrate", "import-tio": "migrate",
    "users": "inspection", "tokens": "inspection", "user": "user", "instances": "inspection", "audit": "inspection",
    "config": "inspection",
    "cleanup-logs": "ops", "backup": "ops", "restore": "ops", "maintenance": "ops", "doctor": "ops",
    "refresh-worker": "refresh",
    "copy": "copy",
    "key": "key",
    "metrics": "metrics",
    "auth": "auth",
    "backups": "offsite",
}
"""Each command of ``kissbot`` and the module of :mod:`kissbot.cli` that defines it."""


class KissbotGroup(click.Group):
    """The ``kissbot`` group: loads a command's module when the command is used
    (:data:`COMMAND_MODULES`, so ``kissbot stats`` imports no other command's
    dependencies), and turns every error, usage errors included, into one line on
    stderr and exit status 1 (``-v`` also prints the traceback, secrets masked).
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"kissbot.cli.{COMMAND_MODULES[cmd_name]}")
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from exc
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get(_VERBOSE):
                click.echo(mask_secrets("".join(traceback.format_exc()), ()), err=True, nl=False)
            raise click.ClickException(_one_line(exc)) from exc


def _usage_error(exc: click.UsageError) -> click.ClickException:
    """A usage error (bad option value, unknown option or command, missing argument) as one ``Error:`` line, exit 1.

    Click would print the usage block above it and exit with status 2; the
    message already names the option and what is wrong with its value.
    """
    return click.ClickException(mask_secrets(" ".join(exc.format_message().split()), ()))


def _one_line(exc: Exception) -> str:
    """The message of an error that reached the command line, on one line and with secrets masked."""
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, KissbotError):
        message = str(exc)
    elif isinstance(exc, SQLAlchemyError):
        message = f"database error: {driver_message(exc)}"
    elif isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.filename or 'file'}: {exc.strerror}"
    elif isinstance(exc, RecursionError):
        message = "the input is nested too deeply"
    else:
        first = str(exc).strip().splitlines()
        detail = f" ({mask_secrets(first[0][:200], ())})" if first else ""
        message = f"unexpected {type(exc).__name__}{detail}; run with -v for the traceback"
    return message


_VERBOSE = "kissbot.verbose"
"""The ``ctx.meta`` key recording ``-v``, for the error boundary."""


class Seconds(click.FloatRange):
    """A :class:`click.FloatRange` that refuses NaN (which every range comparison lets through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        result = super().convert(value, param, ctx)
        if math.isnan(result):
            self.fail(f"{value!r} is not a number of seconds.", param, ctx)
        return result


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record to the ``sys.stderr`` of the moment (CliRunner swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _set_verbosity(ctx: click.Context, _param: click.Parameter, verbose: int) -> None:
    """``-v``: kissbot's INFO logs on stderr; ``-vv``: DEBUG, with each SQL statement (never its parameters)."""
    ctx.meta[_VERBOSE] = verbose
    root = logging.getLogger()
    # Undo an earlier command's setting (several commands can run in one process, e.g. under CliRunner).
    for logger in (root, logging.getLogger("kissbot")):
        for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(handler)
    logging.getLogger("kissbot").setLevel(logging.NOTSET)
    if not verbose:
        # kissbot's warnings (e.g. "back up the new key now") reach the operator without -v.
        notices = _StderrHandler()
        notices.setLevel(logging.WARNING)
        notices.setFormatter(logging.Formatter("Warning: %(message)s"))
        logging.getLogger("kissbot").addHandler(notices)
        ctx.call_on_close(lambda: logging.getLogger("kissbot").removeHandler(notices))
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    logging.getLogger("kissbot").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (datetimes in ISO 8601)."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--db``, ``--url``, ``--key-file``, ``--synchronous`` and ``-v`` to a command; pass a :class:`StoreTarget`."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any, db_path: Path, url: str | None, key_file: Path | None, synchronous: str | None, **kwargs: Any
    ) -> Any:
        return fn(*args, store=StoreTarget(db_path, url, key_file, synchronous), **kwargs)

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
            "--key-file", type=click.Path(dir_okay=False, path_type=Path),
            envvar="KISSBOT_KEY_FILE", show_envvar=True,
            help="Fernet key file [default: .kissbot.key beside the --db file, or in the current directory for --url].",
        ),
        click.option(
            "--synchronous", metavar="OFF|NORMAL|FULL|EXTRA",
            help="SQLite durability (default: env KISSBOT_SQLITE_SYNCHRONOUS, else NORMAL, which may lose the "
            "last commits on power loss; FULL does not).",
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
