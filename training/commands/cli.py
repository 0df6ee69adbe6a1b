"""`deit-distill`: one command line for the whole workflow.

deit-distill train ARGS | recipe.json       train a student (or a convnet teacher)
deit-distill eval MODEL [--teacher T]       evaluate every head (and the teacher) on a dataset split
deit-distill predict MODEL IMAGE...         run the image-classification pipeline
deit-distill convert ...                    convert transformers/timm checkpoints, both directions
deit-distill card RUN_DIR                   regenerate a run's model card
deit-distill push RUN_DIR --repo-id ID      push a run to the Hub (optionally with a native copy)
deit-distill demo                           the end-to-end Fashion-MNIST demo
"""

from __future__ import annotations

import argparse
import json
import sys


def _train(argv: list[str]) -> None:
    from training.train import main

    main(argv)


def _eval(args: argparse.Namespace) -> None:
    from training.eval_model import evaluate_model

    metrics = evaluate_model(
        args.model,
        dataset_name=args.dataset_name,
        dataset_config=args.dataset_config,
        eval_split=args.eval_split,
        max_eval_samples=args.max_eval_samples,
        teacher=args.teacher,
        batch_size=args.batch_size,
    )
    print(json.dumps(metrics, indent=2))


def _predict(args: argparse.Namespace) -> None:
    from transformers import pipeline

    classifier = pipeline("image-classification", model=args.model, trust_remote_code=True)
    for image in args.images:
        predictions = classifier(image, top_k=args.top_k)
        shown = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in predictions)
        print(f"{image}: {shown}")


def _card(args: argparse.Namespace) -> None:
    from model_cards import write_model_card

    print(write_model_card(args.run_dir, repo_id=args.repo_id))


def _push(args: argparse.Namespace) -> None:
    from model_cards import push_run

    result = push_run(
        args.run_dir,
        repo_id=args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        push_native=args.push_native,
    )
    print(f"pushed {result.commit_url}")
    if result.native_commit_url:
        print(f"native copy (no remote code): {result.native_commit_url}")


def _convert(args: argparse.Namespace) -> None:
    from training.convert_cli import run_convert

    run_convert(args)


def _demo(argv: list[str]) -> None:
    from training.demo import main

    main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deit-distill", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "train", help="train a model (arguments: see `deit-distill train --help`)", add_help=False
    )
    commands.add_parser("demo", help="the end-to-end Fashion-MNIST demo", add_help=False)

    evaluate = commands.add_parser("eval", help="evaluate every head of a saved model")
    evaluate.add_argument("model", help="saved model directory or Hub id")
    evaluate.add_argument("--dataset_name", default="fashion_mnist")
    evaluate.add_argument("--dataset_config", default=None)
    evaluate.add_argument("--eval_split", default=None)
    evaluate.add_argument("--max_eval_samples", type=int, default=None)
    evaluate.add_argument(
        "--teacher", default=None, help="also report the teacher and student-teacher agreement"
    )
    evaluate.add_argument("--batch_size", type=int, default=64)
    evaluate.set_defaults(func=_eval)

    predict = commands.add_parser("predict", help="classify images with the pipeline")
    predict.add_argument("model")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--top_k", type=int, default=3)
    predict.set_defaults(func=_predict)

    card = commands.add_parser("card", help="regenerate the model card of a saved run")
    card.add_argument("run_dir")
    card.add_argument("--repo-id", dest="repo_id", default=None, help="repo id used in the usage snippets")
    card.set_defaults(func=_card)

    push = commands.add_parser("push", help="push a saved run to the Hub")
    push.add_argument("run_dir")
    push.add_argument("--repo-id", dest="repo_id", required=True)
    push.add_argument("--token", default=None, help="defaults to HF_TOKEN or the stored login")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    push.add_argument("--commit-message", dest="commit_message", default=None)
    push.add_argument(
        "--push-native",
        dest="push_native",
        default=None,
        help="also push a transformers-native copy (no remote code) to this branch, or to this repo id if it "
        "contains '/'",
    )
    push.set_defaults(func=_push)

    from training.convert_cli import add_convert_arguments

    add_convert_arguments(commands.add_parser("convert", help="convert checkpoints (transformers, timm)"))
    commands.choices["convert"].set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # train and demo own their (HfArgumentParser) arguments, --help included.
    if argv and argv[0] == "train":
        return _train(argv[1:])
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
