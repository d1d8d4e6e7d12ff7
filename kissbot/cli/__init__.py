"""The ``kissbot`` command line: one module per group of commands."""

from kissbot.cli.main import cli
from kissbot.cli import store  # noqa: F401  (registers init-db, stats)
from kissbot.cli import adopt  # noqa: F401  (registers adopt)
from kissbot.cli import migrate  # noqa: F401  (registers migrate-yaml, import-tio)
from kissbot.cli import inspection  # noqa: F401  (registers users, tokens, instances, audit, config)
from kissbot.cli import ops  # noqa: F401  (registers cleanup-logs, backup, restore, maintenance, doctor)
from kissbot.cli import refresh  # noqa: F401  (registers refresh-worker)
from kissbot.cli import copy  # noqa: F401  (registers copy)
from kissbot.cli import key  # noqa: F401  (registers key status, rotate, retire, reset)

__all__ = ["cli"]
