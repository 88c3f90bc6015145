"""Errors a user can cause and fix: bad config values, paths, checkpoints, data, workdirs.

Library code raises `UserError` at its edges (where it reads what a user gave it); the
command line prints `error: <message>` and `hint: <hint>` on stderr, without a traceback
(`--debug` shows it), and exits with `exit_code`. Every other exception is an internal
error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, stated in one line, with a hint on what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(UserError):
    """A config value (or a flag) is invalid; found before any work, exit status 2."""

    exit_code = 2
