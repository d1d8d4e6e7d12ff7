"""``python -m kissbot``: the same as the ``kissbot`` command."""

from kissbot.cli import cli

cli(prog_name="kissbot")
