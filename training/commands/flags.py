"""One flag style for the argparse commands: every option answers to `--foo_bar` and `--foo-bar`, as
`HfArgumentParser` (train, eval, demo) already does."""

from __future__ import annotations

import argparse
from typing import Any


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add `--name` (underscores) and its dashed spelling, stored under `name`."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)
