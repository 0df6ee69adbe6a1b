"""`deit-distill card RUN_DIR` and `deit-distill push RUN_DIR --repo_id ID`: the model card and the Hub push."""

from __future__ import annotations

import argparse
import sys

from deit_distill.training.checkpoints import check_model_folder
from deit_distill.training.errors import Interrupted, UserError

from .flags import CommandParser, add_flag


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deit-distill")
    commands = parser.add_subparsers(dest="command", required=True)

    card = commands.add_parser("card", help="regenerate the model card of a saved run")
    card.add_argument("run_dir")
    add_flag(card, "repo_id", default=None, help="repo id used in the usage snippets")

    push = commands.add_parser("push", help="push a saved run to the Hub")
    push.add_argument("run_dir")
    add_flag(push, "repo_id", required=True)
    add_flag(push, "token", default=None, help="defaults to HF_TOKEN or the stored login")
    add_flag(push, "private", action="store_true")
    add_flag(push, "revision", default=None, help="branch to push to (created if missing)")
    add_flag(push, "commit_message", default=None)
    add_flag(
        push,
        "push_native",
        default=None,
        help="also push a transformers-native copy (no remote code) to this branch, or to this repo id if it "
        "contains '/'",
    )
    add_flag(push, "with_onnx", action="store_true", help="also push an ONNX export (fp32, int8) in onnx/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deit_distill.model_cards import PushError, push_run, write_model_card

    if args.command == "card":
        print(write_model_card(args.run_dir, repo_id=args.repo_id))
        return 0
    # Never publish a damaged model: its weights, config and processor are checked before anything is sent.
    check_model_folder(args.run_dir, "push")
    try:
        result = push_run(
            args.run_dir,
            repo_id=args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            push_native=args.push_native,
            with_onnx=args.with_onnx,
        )
    except PushError as error:
        raise UserError(str(error)) from error
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (errors.Terminated)
        # Each Hub commit lands whole or not at all: an interrupted one leaves no partial files.
        raise Interrupted(
            f"interrupted; the push to {args.repo_id} did not finish and no partial commit was made (a "
            "commit lands whole or not at all); run the same command again to push."
        ) from stop
    print(f"pushed {result.commit_url}")
    if result.native_commit_url:
        print(f"native copy (no remote code): {result.native_commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
