"""Errors a user can cause and fix: bad config values, paths, checkpoints, data, workdirs.

Library code raises `UserError` at its edges (where it reads what a user gave it); the
command line prints `error: <message>` and `hint: <hint>` on stderr, without a traceback
(`--debug` shows it), and exits with `exit_code`. Every other exception is an internal
error and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
import traceback


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


def fail(error: UserError, debug: bool = False) -> None:
    """Prints a user error as `error:` and `hint:` lines on stderr (the traceback too with
    `debug`) and exits with its status: how every command line ends on one."""
    if debug:
        traceback.print_exception(error)
    sys.stderr.write(f"error: {error.message}\n")
    if error.hint:
        sys.stderr.write(f"hint: {error.hint}\n")
    sys.exit(error.exit_code)


@contextlib.contextmanager
def user_errors_as_lines(debug: bool = False):
    """Runs the body of a command line; a UserError out of it ends the process through `fail`
    (error and hint lines, its exit status) instead of a traceback."""
    try:
        yield
    except UserError as e:
        fail(e, debug)
