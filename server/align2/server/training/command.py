"""The ``align2 train-heads`` subcommand: its arguments, and running it.

Importing this module is cheap (no torch): align2.server.cli registers the parser for every
command. The environment is read by the caller (cli.main) and passed in.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from align2.server.training.pipeline import TrainHeadsConfig

DATA_ENV = "ALIGN2_PREFERENCE_DATA"
"""Environment variable naming the preference data folder when --data is not given."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-heads",
        help="train the reward models' score heads on the human preference data",
    )
    add_data_arguments(p, "write the trained heads here as question.json/answer.json")
    p.add_argument("--question-model", help="reward checkpoint folder or embedded:NAME")
    p.add_argument("--answer-model", help="reward checkpoint folder or embedded:NAME")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward (16)")


def add_data_arguments(p: Any, out_help: str) -> None:
    """The arguments every training command takes: data, cache, output, heads, split."""
    p.add_argument("--data", help=f"folder of the preference files (default: ${DATA_ENV})")
    p.add_argument("--cache-dir", help="embedded models and cached inputs (~/.cache/align2)")
    p.add_argument("--out", help=out_help)
    p.add_argument(
        "--evaluate-test",
        action="store_true",
        help="also evaluate on the *-test.json files (the final report only)",
    )
    p.add_argument("--heads", default="question,answer", help="which (default: both)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="images held out (0.2)")


def to_config(
    args: argparse.Namespace, cache_dir: pathlib.Path, data_env: str | None
) -> TrainHeadsConfig:
    """Typed config from parsed arguments; SystemExit when no data folder is given."""
    from align2.server.training.pipeline import TrainHeadsConfig

    common = data_arguments(args, data_env, "train-heads")
    defaults = TrainHeadsConfig(data_dir=common["data_dir"], cache_dir=cache_dir)
    models = dict(defaults.models)
    for head, path in (("question", args.question_model), ("answer", args.answer_model)):
        if path:
            models[head] = path
    return TrainHeadsConfig(
        **common, cache_dir=cache_dir, models=models, batch_size=args.batch_size
    )


def data_arguments(args: argparse.Namespace, data_env: str | None, command: str) -> dict[str, Any]:
    """The typed values of :func:`add_data_arguments`' arguments, named as both training
    configs name them; SystemExit when no data folder is given."""
    data_dir = args.data or data_env
    if not data_dir:
        raise SystemExit(f"align2 {command}: give --data DIR or set ${DATA_ENV}")
    return {
        "data_dir": pathlib.Path(data_dir),
        "heads": tuple(h.strip() for h in args.heads.split(",") if h.strip()),
        "out": pathlib.Path(args.out) if args.out else None,
        "evaluate_test": args.evaluate_test,
        "val_fraction": args.val_fraction,
    }


def run(config: TrainHeadsConfig) -> int:
    """Train, print the report to stdout, return the exit code."""
    from align2.server.training.pipeline import run as run_pipeline
    from align2.server.training.report import format_report

    try:
        reports = asyncio.run(run_pipeline(config))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"align2 train-heads: {exc}") from None
    print(format_report(reports))
    return 0
