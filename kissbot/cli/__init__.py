"""The ``kissbot`` command line: one module per group of commands."""

from kissbot.cli.main import cli
from kissbot.cli import store  # noqa: F401  (registers init-db, stats)
from kissbot.cli import adopt  # noqa: F401  (registers adopt)
from kissbot.cli import migrate  # noqa: F401  (registers migrate-yaml, import-tio)
from kissbot.cli import inspection  # noqa: F401  (registers users, tokens, instances, audit, config)

__all__ = ["cli"]
