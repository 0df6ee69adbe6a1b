"""One flag style for every command: each option answers to `--foo_bar` and `--foo-bar` (as `HfArgumentParser`
does for train, eval, analyze), an unknown or misspelt flag is one line naming the nearest known flag, and a bad
value is one line naming its flag. No abbreviations: `--max_step` is a mistake, not `--max_steps`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import textwrap
from collections.abc import Collection, Iterable, Sequence
from dataclasses import MISSING, fields
from typing import Any, NoReturn

from transformers import HfArgumentParser

from deit_distill.training.errors import UserError

_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")
_ALIASES = re.compile(r"(--[\w]+)(/--[\w-]+)+")


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add `--name` (underscores) and its dashed spelling, stored under `name`."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every `--flag` the parser accepts, in its underscore spelling, in order."""
    names = [
        option.replace("-", "_").replace("__", "--", 1)
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    ]
    return list(dict.fromkeys(names))


# Names users bring from other tools (timm's train.py, PyTorch examples), for flags spelt differently here.
COMMON_NAMES = {
    "--lr": "--learning_rate",
    "--epochs": "--num_train_epochs",
    "--batch_size": "--per_device_train_batch_size",
    "--bs": "--per_device_train_batch_size",
    "--wd": "--weight_decay",
    "--weight-decay": "--weight_decay",
    "--workers": "--dataloader_num_workers",
    "--num_workers": "--dataloader_num_workers",
    "--data": "--dataset_name",
    "--dataset": "--dataset_name",
    "--data_dir": "--dataset_name",
    "--model": "--model_name_or_path",
    "--output": "--output_dir",
    "--out": "--output_dir",
    "--steps": "--max_steps",
    "--warmup_epochs": "--warmup_steps",
    "--smoothing": "--label_smoothing",
    "--img_size": "--image_size",
    "--input_size": "--image_size",
    "--amp": "--bf16",
    "--resume": "--resume_from_checkpoint",
}


def unknown_flag_message(given: str, known: Iterable[str], where: str = "") -> str:
    """`unknown flag --max_stepz; did you mean --max_steps?`, or a pointer to --help when nothing is close."""
    flag = "--" + given.lstrip("-").split("=")[0].replace("-", "_")
    known = list(known)
    if COMMON_NAMES.get(flag) in known:
        return f"unknown flag {flag}{where}; did you mean {COMMON_NAMES[flag]}?"
    if flag in COMMON_NAMES:  # a training flag given to a command that does not train
        return f"unknown flag {flag}{where}: this command takes no {COMMON_NAMES[flag]}; see --help for its flags."
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see --help for the flags."
    return f"unknown flag {flag}{where}; {hint}"


def unknown_arguments_error(remaining: list[str], known: Iterable[str], where: str = "") -> UserError:
    """The error for arguments a parser left over: the first unknown flag with its nearest match, or the stray value."""
    flags = [token for token in remaining if token.startswith("-") and not _is_number(token)]
    if flags:
        return UserError(unknown_flag_message(flags[0], known, where))
    return UserError(
        f"unexpected argument {remaining[0]!r}{where}: every value follows its flag (--flag VALUE)."
    )


def refused_value_error(error: BaseException, known: Iterable[str]) -> UserError:
    """One line for a value a library refused, led by the first flag its message names (whole words: `steps` is
    not in `warmup_steps`), so the user knows which flag to change."""
    message = " ".join(str(error).split()) or type(error).__name__
    found = [
        (match.start(), flag)
        for flag in known
        if (match := re.search(rf"\b{re.escape(flag[2:])}\b", message))
    ]
    if not found:
        return UserError(f"{message} (check the flags given, or see --help)")
    return UserError(f"{min(found)[1]}: {message}")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class _OneLineErrors:
    """argparse's `error()` prints the whole usage and exits; raise one `UserError` line instead."""

    def error(self, message: str) -> NoReturn:  # argparse's signature
        match = _UNRECOGNIZED.match(message)
        if match:
            raise unknown_arguments_error(match.group(1).split(), option_names(self))
        # "argument --max_steps/--max-steps: invalid int value: 'abc'": the flag once, as the user may write it.
        message = _ALIASES.sub(r"\1", message).rstrip(".")
        raise UserError(f"{message}.")


class CommandParser(_OneLineErrors, argparse.ArgumentParser):
    """The argparse parser of the commands (predict, export, convert, card, push, push-cache)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        # A misspelt flag first: argparse would otherwise report the flag it hides as "required".
        known = _all_option_names(self)
        for token in args or ():
            name = token.split("=")[0]
            if name.startswith("--") and name.replace("-", "_").replace("__", "--", 1) not in known:
                raise UserError(unknown_flag_message(name, known))
        return super().parse_args(args, namespace)


def _all_option_names(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's flags and those of its sub-commands (card, push)."""
    names = option_names(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names += option_names(subparser)
    return names


class DataclassParser(_OneLineErrors, HfArgumentParser):
    """`HfArgumentParser` (train, eval, analyze) with one-line errors and a suggestion for an unknown flag."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types, **kwargs)

    def parse_flags(self, argv: list[str], where: str = "") -> tuple[Any, ...]:
        """The dataclasses from `argv`; an unknown flag is a `UserError` naming the nearest known one, and a value
        a dataclass refuses (transformers' TrainingArguments checks many in `__post_init__`) one naming its flag."""
        try:
            *values, remaining = self.parse_args_into_dataclasses(
                args=argv, return_remaining_strings=True, look_for_args_file=False
            )
        except UserError:
            raise
        except ValueError as error:
            raise refused_value_error(error, option_names(self)) from error
        if remaining:
            raise unknown_arguments_error(remaining, option_names(self), where)
        return tuple(values)


def format_flag(name: str, help_text: str, default: Any = None) -> str:
    """One flag of a `--help`: the name, then its help wrapped under it, with the default when it says something."""
    shown = "" if default in (None, MISSING) or help_text.rstrip().endswith(")") else f" (default: {default})"
    return textwrap.fill(
        f"{help_text}{shown}", width=110, initial_indent=f"  --{name:<28} ", subsequent_indent=" " * 33
    )


def dataclass_help(usage: str, groups: Sequence[tuple[str, type]], exclude: Collection[str] = ()) -> str:
    """A short `--help`: the usage, then each group's flags (a dataclass each, less `exclude`) with their help."""
    lines = [usage.rstrip()]
    for title, cls in groups:
        lines.append(f"\n{title}:")
        lines += [
            format_flag(spec.name, spec.metadata.get("help", ""), spec.default)
            for spec in fields(cls)
            if spec.name not in exclude
        ]
    return "\n".join(lines)
