"""`deit-distill`: one command line for the whole workflow.

deit-distill train ARGS | recipe.json       train a student, or fine-tune any image classifier (a teacher)
deit-distill eval MODEL_OR_RUN [ARGS]       evaluate every head (and the teacher) on a dataset split
deit-distill analyze MODEL_OR_RUN [ARGS]    CLS/DIST token and head cosines, per-head agreement (--json)
deit-distill predict MODEL FILES/DIRS...    classify images (files and folders), text or --json
deit-distill convert ...                    convert transformers/timm checkpoints, both directions
deit-distill export MODEL --output OUT      ONNX export (checked against PyTorch), optionally int8
deit-distill card RUN_DIR                   regenerate a run's model card
deit-distill push RUN_DIR --repo_id ID      push a run to the Hub (optionally with a native copy)
deit-distill demo                           the end-to-end Fashion-MNIST demo
deit-distill cache-teacher ARGS --teacher_cache DIR   run the teacher once over every training view (train's ARGS)
deit-distill push-cache DIR --repo_id ID    push a teacher cache to the Hub as a dataset repo
deit-distill views RECIPE_OR_RUN --output views.png   a grid of training images and their views at an epoch

Every flag is accepted as --foo_bar and as --foo-bar; `deit-distill COMMAND --help` lists a command's flags.
Expected errors (a bad flag value, a missing file, a misspelt flag) print one line, `deit-distill: error: ...`,
and exit 2; Ctrl-C prints one line saying what was left and exits 130 (SIGTERM: the same line, exit 143). Set
--debug or DEIT_DISTILL_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Light imports only: this module is the console script's, and a Ctrl-C while torch and datasets load must
# already get its one line (each command's module is imported inside `main`).
from deit_distill.training.errors import Interrupted, Terminated, UserError

# Sub-command -> module in deit_distill.training.commands with a `main(argv)`; each parses its own flags (--help included).
COMMANDS = {
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "convert": "convert",
    "export": "export",
    "card": "hub",
    "push": "hub",
    "demo": "demo",
    "cache-teacher": "cache_teacher",
    "analyze": "analyze",
    "push-cache": "push_cache",
    "views": "views",
}


def is_expected_error(error: BaseException) -> bool:
    """A user's mistake (one line), as opposed to a bug (a traceback)."""
    if isinstance(error, (UserError, FileNotFoundError)):
        return True
    # An image error can only come once data.py is loaded.
    data = sys.modules.get("deit_distill.training.data")
    return data is not None and isinstance(error, data.CorruptImageError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DEIT_DISTILL_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(
            f"deit-distill: error: unknown command {command!r}; one of {', '.join(COMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    try:
        module = importlib.import_module(f"deit_distill.training.commands.{COMMANDS[command]}")
        with sigterm_as_interrupt():
            status = module.main([command, *rest]) if COMMANDS[command] == "hub" else module.main(rest)
    except (Interrupted, KeyboardInterrupt) as stop:
        if debug:
            raise
        # A command that knows what an interruption leaves behind says so; otherwise the plain fact.
        print_last_line(f"deit-distill {command}: {str(stop) or 'interrupted.'}")
        terminated = isinstance(stop, Terminated) or isinstance(stop.__cause__, Terminated)
        return 143 if terminated else 130  # the shell's status for SIGTERM, SIGINT
    except Exception as error:
        if debug or not is_expected_error(error):
            raise
        # One line, also when a library's message we pass on has several.
        print_last_line("deit-distill: error: " + " ".join(part.strip() for part in str(error).splitlines()))
        return 2
    except SystemExit as done:  # --help, and argparse's own exits
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    return status if isinstance(status, int) else 0


def print_last_line(line: str) -> None:
    """A command's last word, on a line of its own. A progress bar (tqdm) left open owns the current line, without a
    newline, and would be drawn again at exit, after the message: close every open bar first (each ends its line).
    On a terminal, also clear the current line, for any other progress output."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        if not getattr(bar, "disable", True):
            bar.close()
    # One write, newline included: the processes of a multi-process launch share stderr, and print() writes the
    # newline apart, so two processes' lines could run together.
    sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + line + "\n")
    sys.stderr.flush()


def _raise_terminated(signal_number: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM ends it as Ctrl-C does: its one line, its cleanup (a run's folder lock), its exit.

    A SIGTERM that the caller set to be ignored stays ignored, as does one arriving off the main thread's watch.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def entry_point() -> None:
    """The `deit-distill` console script."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before a command started (while its modules load): nothing was done
        print("deit-distill: interrupted.", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `deit-distill ... | head`: the reader left, which is no error of ours
        # Python's documented way: point stdout at devnull so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    entry_point()
