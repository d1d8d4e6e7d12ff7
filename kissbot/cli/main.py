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
import textwrap
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

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
        """The URL if given (refused unless well formed and supported), else the SQLite path; never in memory."""
        from kissbot.errors import ConfigurationError
        from kissbot.urls import is_memory, parse_url, to_url

        url = parse_url(self.url) if self.url else to_url(self.db_path)
        if is_memory(url):
            raise ConfigurationError(
                f"{self.url or self.db_path} is an in-memory SQLite database, empty and gone when the command ends: "
                "give a file (--db PATH, or --url sqlite:///PATH) or a PostgreSQL URL"
            )
        return url.render_as_string(hide_password=False) if self.url else os.fspath(self.db_path)

    def open(self, create: bool = True, need_key: bool = True):  # -> kissbot.DatabaseManager
        """Open the store (migrating it, loading the key).

        With ``create`` (the default) a missing database and key file are
        created and an old schema is migrated; read-only commands pass
        ``create=False`` so that a wrong path gives ``Error: database … does
        not exist; create it with kissbot init-db`` instead of a new empty
        store, and an old database is left as it is. Commands that decrypt
        nothing pass ``need_key=False``: they work without the key file.
        """
        from kissbot.manager import DatabaseManager

        return DatabaseManager(
            self.db_path, self.key_file, url=self.target if self.url else None, synchronous=self.synchronous,
            create=create, need_key=need_key,
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
    if ctx.get_parameter_source("verbose") is not click.core.ParameterSource.COMMANDLINE and _VERBOSE in ctx.meta:
        return  # given to the group (kissbot instances -v reset 3)
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


def echo_json_rows(rows: Iterable[Any]) -> None:
    """Print ``rows`` exactly as :func:`echo_json` prints a list of them, one row at a time (constant memory)."""
    opening = "[\n"
    for row in rows:
        click.echo(opening + textwrap.indent(json.dumps(row, indent=2, ensure_ascii=False, default=_json_default), "  "), nl=False)
        opening = ",\n"
    click.echo("[]" if opening == "[\n" else "\n]")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_STORE_PARAMS = ("db_path", "url", "key_file", "synchronous")


def _store_option_list(*, command: bool) -> list[Callable[[Any], Any]]:
    """``--db``, ``--url``, ``--key-file``, ``--synchronous``: a command's (defaults, environment) or the group's."""

    def env(name: str) -> dict[str, Any]:
        # The environment is read by the command's options only, so that an option given before the command wins.
        return {"envvar": name, "show_envvar": True} if command else {}

    return [
        click.option(
            "--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
            default=Path("kissbot.db") if command else None, show_default=command, **env("KISSBOT_DB"),
            help="SQLite database file.",
        ),
        click.option(
            "--url", **env("KISSBOT_DB_URL"),
            help="Database URL instead of --db, e.g. postgresql+psycopg://kissbot@db/kissbot.",
        ),
        click.option(
            "--key-file", type=click.Path(dir_okay=False, path_type=Path), **env("KISSBOT_KEY_FILE"),
            help="Fernet key file [default: .kissbot.key beside the --db file, or in the current directory for --url].",
        ),
        click.option(
            "--synchronous", metavar="OFF|NORMAL|FULL|EXTRA",
            help="SQLite durability (default: env KISSBOT_SQLITE_SYNCHRONOUS, else NORMAL, which may lose the "
            "last commits on power loss; FULL does not).",
        ),
    ]


def _given_before(ctx: click.Context, name: str) -> tuple[bool, Any]:
    """The value of a store option given on the command line before the command (``kissbot --db X users``)."""
    parent = ctx.parent
    while parent is not None:
        if parent.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            return True, parent.params[name]
        parent = parent.parent
    return False, None


def refuse_store_options_before(ctx: click.Context, command: str, hint: str) -> None:
    """Refuse the store options given before a command that takes none (``kissbot --db X copy`` would ignore it)."""
    for option in ctx.find_root().command.params:
        if option.name in _STORE_PARAMS and _given_before(ctx, option.name)[0]:
            raise click.UsageError(f"kissbot {command} does not take {option.opts[0]}: {hint}")


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--db``, ``--url``, ``--key-file``, ``--synchronous`` and ``-v`` to a command; pass a :class:`StoreTarget`.

    The command's own options win, then the same options given before the
    command, then the environment, then the defaults.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        values = {name: kwargs.pop(name) for name in _STORE_PARAMS}
        for name in _STORE_PARAMS:
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
                given, value = _given_before(ctx, name)
                if given:
                    values[name] = value
        return fn(*args, store=StoreTarget(**values), **kwargs)

    options = [
        *_store_option_list(command=True),
        click.option(
            "-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity,
            help="Log what happens (-vv for debug).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _group_store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_store_option_list(command=False)):
        fn = option(fn)
    return fn


@click.group(cls=KissbotGroup)
@click.version_option(__version__, prog_name="kissbot")
@_group_store_options
def cli(**_store: Any) -> None:
    """kissbot: the encrypted OAuth token store shared by Twitch bots.

    The store options may also come before the command (kissbot --db
    kissbot.db users); the command's own win.

    \b
    Example:
        kissbot init-db --db kissbot.db
        kissbot --db kissbot.db stats --json
    """
