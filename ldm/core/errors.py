"""Errors a user can cause and fix: a bad config value, a missing folder, a broken data file.

Each is raised where the problem is found, with a message that says what was wrong and what to
do. The command lines (``ldm.cli.common.user_errors``) print that message as one line,
``prog: error: <message>``, and exit with status 2; any other exception is a bug and keeps its
traceback. Each class also derives from the built-in error it replaces (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` in callers still works.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config's schema or its bounds."""


class DataError(UserError, ValueError):
    """Training or evaluation data that cannot be used: a missing or empty ``data.path``, a broken
    ``metadata.jsonl`` line, a CSV without its column, too few items."""


class MissingFileError(UserError, FileNotFoundError):
    """A model, checkpoint or weights file that is not where the config or the command line says."""


class ModelError(UserError, ValueError):
    """A model folder or weights file that exists but cannot be used as asked (wrong kind, parts that
    do not fit together)."""
