"""Errors a user can fix: the command line prints them as one line (`deit-distill: error: ...`), no traceback."""

from __future__ import annotations

import re


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


def with_reason(before: str, reason: object, after: str = "") -> str:
    """`before` + a library's `reason` (an exception or its text) + `after`, joined into one clean line.

    The reason's first line is used ("no detail" for none). Where two parts meet, a word is not repeated (json's
    "Invalid control character at" then our "at line 1") and a sentence mark is not doubled (PIL's "... DOS
    attack." then our ". Remove it"): ours is kept, the library's dropped.
    """
    text = str(reason).strip()
    text = text.splitlines()[0].strip() if text else "no detail"
    return _joined(_joined(before, text), after)


_SENTENCE_MARKS = ".!?;:,"


def _joined(left: str, right: str) -> str:
    if not left or not right:
        return left + right
    if right[0] in _SENTENCE_MARKS and left.rstrip()[-1:] in _SENTENCE_MARKS:
        return left.rstrip().rstrip(_SENTENCE_MARKS) + right
    last, first = re.search(r"([A-Za-z]+)\s*$", left), re.match(r"\s*([A-Za-z]+)\b", right)
    separate = left[-1].isspace() or right[0].isspace()
    if last and first and separate and last.group(1).lower() == first.group(1).lower():
        return left[: last.start(1)] + right.lstrip()
    return left + right
