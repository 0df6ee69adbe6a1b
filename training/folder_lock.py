"""A run owns the folder it writes while it runs: `train` its `--output_dir`, `cache-teacher` its cache folder.

The lock is a small JSON file in the folder naming the holder's host, pid, start time and command. It is taken
before anything is written or deleted there, with an atomic `os.link` (the file appears whole or not at all), and
removed on any exit that runs Python's `finally` (normal end, error, Ctrl-C). A lock left by a crash (kill -9, a
lost machine) is recognisable: on the same host a holder pid that no longer runs means stale, and it is taken over
with a warning; a lock from another host cannot be checked from here, so the message says how to remove it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

LOCK_FILE = ".deit_distill.lock"
logger = logging.getLogger(__name__)


class FolderBusyError(UserError):
    """Another live run holds the folder."""


def holder_description(holder: dict[str, Any]) -> str:
    return (
        f"{holder.get('command', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"started {holder.get('started', '?')})"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's contents, or `None` when it vanished in between (its holder just released it)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # written by something else: treated as held, with the removal advice


def check_folder_path(folder: str | os.PathLike, flag: str) -> None:
    """Raise, naming `flag`, when `folder` cannot become a folder: it, or a folder above it, is a file."""
    path = Path(os.path.expanduser(folder)).absolute()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"is under {part}, which is a file"
                raise UserError(f"{flag} {folder} {where}, not a folder: choose a folder path.")
            return


def acquire(folder: str | os.PathLike, flag: str, command: str) -> Path:
    """Take the lock of `folder` (created if missing) for this process; returns the lock file.

    Raises:
        FolderBusyError: a live run (or one on another host, or an unreadable lock) holds it.
    """
    check_folder_path(folder, flag)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
    }
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".lock-")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(me, out)
        for _ in range(3):  # a stale lock taken over, or one released between our checks, is retried
            try:
                os.link(partial, lock)
                return lock
            except FileExistsError:
                holder = _read_holder(lock)
            if holder is None:
                continue
            same_host = holder.get("host") == me["host"]
            pid = holder.get("pid")
            if same_host and isinstance(pid, int) and pid != me["pid"] and not _pid_alive(pid):
                logger.warning(
                    "%s %s: taking over the lock of %s, which is no longer running.",
                    flag,
                    folder,
                    holder_description(holder),
                )
                lock.unlink(missing_ok=True)
                continue
            if same_host and isinstance(pid, int):
                raise FolderBusyError(
                    f"{flag} {folder} is in use by {holder_description(holder)}; wait for it to finish, or "
                    f"choose another folder (if no such run is going on, remove {lock})."
                )
            raise FolderBusyError(
                f"{flag} {folder} is locked by {holder_description(holder) if holder else 'an unreadable lock'}, "
                f"which cannot be checked from {me['host']}; if that run is over, remove {lock} and run again."
            )
        raise FolderBusyError(f"{flag} {folder}: could not take its lock {lock}; run again.")
    finally:
        os.unlink(partial)


def release(lock: Path) -> None:
    """Remove the lock if it is still this process's (a taken-over lock belongs to someone else)."""
    holder = _read_holder(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextmanager
def hold_folder(
    folder: str | os.PathLike, flag: str, command: str, *, is_main: bool = True
) -> Iterator[None]:
    """Hold `folder` for the block: only the main process takes the lock, and under several processes every
    other process learns whether it did (and stops with the same error if not).

    A folder this created and left empty (the run failed before writing anything) is removed again.
    """
    folder = Path(folder)
    created = not folder.exists()
    lock, error = None, None
    if is_main:
        try:
            lock = acquire(folder, flag, command)
        except UserError as raised:
            error = raised
    error = _shared_with_all_processes(error, is_main)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            release(lock)
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _shared_with_all_processes(error: UserError | None, is_main: bool) -> UserError | None:
    """The main process's lock error on every process (a no-op in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    message = [str(error) if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if message[0] is None:
        return None
    return error if is_main else FolderBusyError(message[0])
