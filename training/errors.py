"""Errors a user can fix: the command line prints them as one line (`deit-distill: error: ...`), no traceback."""

from __future__ import annotations


class UserError(ValueError):
    """An expected user error: a bad flag or value, a missing file. The message names the flag or file and the fix."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class Interrupted(Exception):
    """The user stopped a command (Ctrl-C); the message says what was left behind ("nothing pushed", ...).

    The CLI prints it as one line and exits 130, the shell's status for SIGINT.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, `kill PID`), handled as Ctrl-C is, so that a run stops at once and
    releases its folder's lock, instead of dying where it stands. The CLI exits 143, the shell's status for SIGTERM.
    """
