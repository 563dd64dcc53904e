"""What ``align2 train-heads`` found, and the table it prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from align2.server.training.evaluate import Trial


@dataclass(frozen=True)
class SplitResult:
    """Pairwise accuracy of the trained head and both baselines on one split's pairs."""

    split: str
    """validation | test."""
    file: str
    groups: int
    pairs: int
    trained: float
    untrained: float
    longer: float


@dataclass(frozen=True)
class FeatureTiming:
    file: str
    inputs: int
    """Unique rendered inputs (one forward each)."""
    seconds: float
    cached: bool
    truncated: int


@dataclass(frozen=True)
class HeadReport:
    head: str
    model: str
    backbone: str
    """Backbone revision (align2.server.models.heads.backbone_revision)."""
    head_dtype: str
    chosen: Trial
    trials: int
    train_groups: int
    train_pairs: int
    splits: tuple[SplitResult, ...]
    features: tuple[FeatureTiming, ...]
    search_seconds: float
    """Training every grid configuration and scoring it on validation."""
    train_seconds: float
    """Training the chosen configuration once more (the shipped head)."""


def split_table(rows: Sequence[tuple[str, SplitResult]], trained: str) -> list[str]:
    """A Markdown table of (head, split) results; ``trained`` names the trained column."""
    lines = [
        f"| head | split | file | groups | pairs | {trained} | untrained head | longer is better |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {head} | {s.split} | {s.file} | {s.groups} | {s.pairs} | {s.trained:.3f} "
        f"| {s.untrained:.3f} | {s.longer:.3f} |"
        for head, s in rows
    ]
    return lines


def format_report(reports: Sequence[HeadReport]) -> str:
    """A Markdown table (one row per head and split) and one paragraph per head."""
    lines = split_table([(r.head, s) for r in reports for s in r.splits], "trained head")
    for r in reports:
        lines += ["", *_describe(r)]
    return "\n".join(lines)


def _describe(r: HeadReport) -> list[str]:
    c = r.chosen.config
    return [
        f"{r.head} head ({r.model}, backbone {r.backbone}, stored as {r.head_dtype}): "
        f"trained on {r.train_pairs} pairs of {r.train_groups} groups; chosen l2={c.l2:g} "
        f"lr={c.lr:g} epochs={c.epochs}, the best of {r.trials} by validation accuracy "
        f"({r.chosen.accuracy:.3f} before rounding to {r.head_dtype}); search "
        f"{r.search_seconds:.1f} s, final training {r.train_seconds:.2f} s.",
        *(
            f"  features of {f.file}: {f.inputs} inputs, "
            + ("cached" if f.cached else f"extracted in {f.seconds:.1f} s")
            + f", {f.truncated} truncated."
            for f in r.features
        ),
    ]
