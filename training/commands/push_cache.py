"""`deit-distill push-cache DIR --repo_id ID`: push a teacher cache to the Hub as a dataset repo, with its card."""

from __future__ import annotations

import argparse
import sys

from deit_distill.training.teacher_cache import push_teacher_cache

from .flags import CommandParser, add_flag


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deit-distill push-cache")
    parser.add_argument("cache_dir", help="a complete teacher cache (deit-distill cache-teacher)")
    add_flag(parser, "repo_id", required=True, help="the dataset repo, e.g. user/regnety160-imagenet-cache")
    add_flag(parser, "token", default=None, help="defaults to HF_TOKEN or the stored login")
    add_flag(parser, "private", action="store_true")
    add_flag(parser, "revision", default=None, help="branch to push to (created if missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = push_teacher_cache(
        args.cache_dir, args.repo_id, token=args.token, private=args.private, revision=args.revision
    )
    print(f"pushed {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
