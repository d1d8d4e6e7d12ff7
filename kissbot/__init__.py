"""kissbot: the encrypted OAuth token store shared by Twitch bot processes."""

from kissbot.errors import KissbotError

__version__ = "0.1.0"

__all__ = ["DatabaseManager", "KissbotError", "__version__", "preload"]

_BOT_MODULES = ("kissbot.manager", "kissbot.aio", "sqlalchemy.orm", "sqlalchemy.dialects.sqlite.pysqlite", "cryptography.fernet")


def preload(*modules: str) -> None:
    """Import what a bot process uses, then ``gc.freeze()``: for a supervisor, just before it forks its bots.

    The forked bots then share the parent's imported code and objects
    (copy-on-write) instead of each importing its own copy: the collector
    never visits frozen objects, so the children do not write to (and copy)
    their pages. Open the stores first (a :class:`DatabaseManager` made
    before the fork stays usable in the children: see :mod:`kissbot.engine`)
    so the database driver and the key are loaded too; ``modules`` names
    more modules to import (e.g. ``"psycopg"``, the bot's own).
    """
    import gc
    import importlib

    for name in (*_BOT_MODULES, *modules):
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def __getattr__(name: str):
    # Imported lazily so `import kissbot.errors` stays cheap for the CLI.
    if name == "DatabaseManager":
        from kissbot.manager import DatabaseManager

        return DatabaseManager
    raise AttributeError(f"module 'kissbot' has no attribute {name!r}")
