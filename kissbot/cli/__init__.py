"""The ``kissbot`` command line: one module per group of commands."""

from kissbot.cli.main import cli
from kissbot.cli import store  # noqa: F401  (registers init-db, stats)
from kissbot.cli import adopt  # noqa: F401  (registers adopt)

__all__ = ["cli"]
