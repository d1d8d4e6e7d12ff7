"""kissbot: the encrypted OAuth token store shared by Twitch bot processes."""

from kissbot.errors import KissbotError

__version__ = "0.1.0"

__all__ = ["DatabaseManager", "KissbotError", "__version__"]


def __getattr__(name: str):
    # Imported lazily so `import kissbot.errors` stays cheap for the CLI.
    if name == "DatabaseManager":
        from kissbot.manager import DatabaseManager

        return DatabaseManager
    raise AttributeError(f"module 'kissbot' has no attribute {name!r}")
