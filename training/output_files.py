"""How the project writes what it saves: every file with the user's umask mode, and output folders replaced whole.

File modes: safetensors (0.8) writes through a private temporary file, so `model.safetensors` came out 0600 while
every other file is `0666 & ~umask`; `use_default_modes` gives the files of a saved folder the mode `open()` gives,
and every writer (the Trainer's saves, `convert`, `export`) calls it.

Output folders (`export --output`, `convert --output`): a new or empty folder is written; a non-empty one is refused
unless `--overwrite true`, and even then only when it holds nothing but what that command writes (a training run,
a subfolder or a file of another kind is never removed). The files are written into a hidden sibling folder first
and moved in at the end, after which nothing of the previous output is left; a failure or Ctrl-C before then leaves
the folder as it was.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .folder_lock import check_folder_path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (`/proc/self/status`)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it, briefly
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The permission bits `open(path, "w")` gives a new file: `0o666 & ~umask`."""
    return 0o666 & ~current_umask()


def use_default_modes(path: str | os.PathLike, *, recursive: bool = False) -> None:
    """Give `path` (a file) or the files in it (a folder; its subfolders' too with `recursive`) the default mode.

    Symbolic links and other non-regular files are left alone.
    """
    path = Path(path)
    mode = default_file_mode()
    files = [path] if not path.is_dir() else path.rglob("*") if recursive else path.iterdir()
    for file in files:
        if file.is_file() and not file.is_symlink() and (file.stat().st_mode & 0o777) != mode:
            os.chmod(file, mode)


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output folder, to recognise a previous output of it.

    Attributes:
        command: The command, for messages ("export").
        what: What its output is called in messages ("an ONNX export").
        markers: Files of which such an output holds at least one.
        suffixes: The kinds of file it writes; a folder with any other entry is not its output.
        foreign: Files of those kinds that it never writes (a training run's record, say).
    """

    command: str
    what: str
    markers: tuple[str, ...]
    suffixes: tuple[str, ...]
    foreign: tuple[str, ...] = ()

    def foreign_entries(self, folder: Path) -> list[str]:
        """The entries of `folder` that this command does not write (subfolders and links included)."""
        return sorted(
            entry.name + ("/" if entry.is_dir() else "")
            for entry in folder.iterdir()
            if entry.is_dir()
            or entry.is_symlink()
            or entry.suffix not in self.suffixes
            or entry.name in self.foreign
        )


def name_listing(names: list[str], limit: int = 4) -> str:
    """`a, b, c, d and 3 more`: the first entries of a folder for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_folder(path: str | os.PathLike, flag: str, kind: OutputKind, overwrite: bool) -> None:
    """Raise a `UserError` unless `path` may be written: missing, empty, or (with `overwrite`) `kind`'s output."""
    check_folder_path(path, flag)
    folder = Path(path)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    entries = sorted(entry.name for entry in folder.iterdir())
    foreign = kind.foreign_entries(folder)
    if foreign or not any((folder / marker).is_file() for marker in kind.markers):
        raise UserError(
            f"{flag} {path} holds files that are not {kind.what} ({name_listing(foreign or entries)}); `{kind.command}` "
            "replaces only its own output: choose a new or empty folder."
        )
    if not overwrite:
        raise UserError(
            f"{flag} {path} holds {kind.what} ({name_listing(entries)}); choose a new or empty folder, or replace it "
            "with --overwrite true."
        )


@contextmanager
def replace_output_folder(
    path: str | os.PathLike, flag: str, kind: OutputKind, overwrite: bool
) -> Iterator[Path]:
    """Yield an empty staging folder to write `kind`'s output into; on success its files become `path`'s whole
    content (with the default file mode), on an exception `path` stays as it was and the staging folder goes.

    `check_output_folder` runs on entry and again before the files move in (the folder may have changed meanwhile).
    """
    check_output_folder(path, flag, kind, overwrite)
    target = Path(path).resolve()  # a symbolic link to a folder: write into the folder it names
    created = [parent for parent in (target, *target.parents) if not parent.exists()]  # innermost first
    staging = target.parent / f".{target.name}.writing-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by a killed process of the same id: it is ours to remove
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise UserError(
            f"{flag} {path}: cannot write in {target.parent} ({error.strerror or error}); choose a folder you can "
            "write to."
        ) from error
    try:
        yield staging
        check_output_folder(path, flag, kind, overwrite)
        use_default_modes(staging)
        if not target.exists():
            os.rename(staging, target)
            return
        written = sorted(entry.name for entry in staging.iterdir())
        stale = sorted({entry.name for entry in target.iterdir()} - set(written))
        for name in written:  # each name holds the old file or the new one, never neither
            # A rename, or a copy where the folder is another file system (a mounted volume).
            shutil.move(staging / name, target / name)
        for name in stale:  # checked above to be files of this command's kind
            (target / name).unlink()
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders made for an output that never came to be (innermost first), if still empty."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
