"""Launcher for `python training/train.py ...` and `accelerate launch training/train.py ...`.

The command itself is `deit_distill.training.commands.train` (also `deit-distill train`); this file only lets the classic
Trainer-script invocation work from a checkout.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from deit_distill.training.commands.cli import main

    # Through the CLI's entry point, so that every process reports an expected error in one line (exit 2).
    sys.exit(main(["train", *sys.argv[1:]]))
