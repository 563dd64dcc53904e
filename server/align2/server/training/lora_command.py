"""The ``align2 train-lora`` subcommand: its arguments, running it, and its report.

Importing this module is cheap (no torch): align2.server.cli registers the parser for every
command. The environment is read by the caller (cli.main) and passed in.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from align2.server.training.command import add_data_arguments, data_arguments

if TYPE_CHECKING:
    from align2.server.training.lora_pipeline import LoraReport, TrainLoraConfig


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-lora",
        help="train the embedded reward models the method's way (LoRA + head, Bradley-Terry)",
    )
    add_data_arguments(p, "write the adapters here (reward-question-lora/, reward-answer-lora/)")
    p.add_argument("--base", help="original-LLaVA base folder or embedded:NAME (reward-base)")
    p.add_argument("--vision-tower", help="its CLIP folder or embedded:NAME (reward-vision)")
    p.add_argument("--layers", type=int, default=None, help="top decoder layers with LoRA")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per run (one split: the best epoch is kept; k-fold, the answer head: "
        "the best count is then trained on every image)",
    )


def to_config(
    args: argparse.Namespace, cache_dir: pathlib.Path, data_env: str | None
) -> TrainLoraConfig:
    """Typed config from parsed arguments; SystemExit when no data folder is given."""
    import dataclasses

    from align2.server.training.lora_pipeline import TrainLoraConfig

    config = TrainLoraConfig(**data_arguments(args, data_env, "train-lora"), cache_dir=cache_dir)
    for key in ("base", "vision_tower"):
        if getattr(args, key):
            config = dataclasses.replace(config, **{key: getattr(args, key)})
    if args.layers is not None:
        config = dataclasses.replace(config, layers=args.layers)
    if args.epochs is not None:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=args.epochs)
        )
    return config


def run(config: TrainLoraConfig) -> int:
    """Train, print the report to stdout, return the exit code."""
    from align2.server.training.lora_pipeline import run as run_pipeline

    try:
        reports = asyncio.run(run_pipeline(config))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"align2 train-lora: {exc}") from None
    print(format_report(reports))
    return 0


def format_report(reports: Sequence[LoraReport]) -> str:
    """A Markdown table (one row per head and split), then one paragraph per head."""
    from align2.server.training.report import split_table

    lines = split_table([(r.head, s) for r in reports for s in r.splits], "trained adapter")
    for r in reports:
        epochs = ", ".join(
            f"{e.epoch}: {e.validation:.3f}" + ("" if e.epoch == 0 else f" ({e.seconds:.0f} s)")
            for e in r.epochs
        )
        how = (
            f"{r.folds}-fold out-of-fold accuracy by epoch {epochs}; trained on every "
            f"image for {r.best_epoch} epochs"
            if r.folds
            else f"validation accuracy by epoch {epochs}; kept epoch {r.best_epoch}"
        )
        lines += [
            "",
            f"{r.head}: LoRA r={r.shape.r} alpha={r.shape.alpha} on layers "
            f"{r.shape.layers[0]}-{r.shape.layers[-1]}, {r.train_pairs} pairs of "
            f"{r.train_groups} groups; learning rate {r.lr:g} (best of "
            f"{', '.join(f'{x:g}' for x in r.learning_rates)}), {how}. Layer inputs "
            f"{r.capture_seconds:.0f} s, training {r.train_seconds:.0f} s; served vs tool "
            f"scores differ by at most {r.served_difference:.2g}.",
        ]
    return "\n".join(lines)
