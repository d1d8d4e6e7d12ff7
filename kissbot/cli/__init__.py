"""The ``kissbot`` command line: one module per group of commands, imported when its command runs."""

from kissbot.cli.main import cli

__all__ = ["cli"]
