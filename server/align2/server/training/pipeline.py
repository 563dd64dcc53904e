"""``align2 train-heads`` end to end, one head at a time.

Per head: resolve the reward checkpoint, load its training file (and the test file when
asked), hold out a validation split by image, extract or read the cached features, search
the grid on validation, train the chosen configuration, round the head to the checkpoint's
head dtype (what the server will multiply by), evaluate it and both baselines, and write it
when asked. The test file is only read when ``evaluate_test`` is set, and nothing is chosen
by it.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from dataclasses import dataclass, field

import torch

from align2.server.backends.checkpoint import read_reward_checkpoint
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import LimitsConfig, ModelConfig
from align2.server.core.templates import TEMPLATE_VERSION
from align2.server.models import embedded, heads
from align2.server.training import data, features
from align2.server.training.bradley_terry import train
from align2.server.training.evaluate import (
    Grid,
    head_scores,
    length_scores,
    pairwise_accuracy,
    search,
    untrained_head,
)
from align2.server.training.report import FeatureTiming, HeadReport, SplitResult

log = logging.getLogger(__name__)

FILES: dict[str, tuple[str, str]] = {
    "question": ("question-train.json", "question-test.json"),
    "answer": ("answer-dev.json", "answer-test.json"),
}
"""Per head: (training file, test file) in the data folder (see its README)."""


@dataclass(frozen=True)
class TrainHeadsConfig:
    """Typed options of ``align2 train-heads`` (argv and environment are read in main)."""

    data_dir: pathlib.Path
    """The folder of the preference files (align2llava-preference)."""
    cache_dir: pathlib.Path
    """Embedded models are built in it and features cached under ``features/``."""
    heads: tuple[str, ...] = ("question", "answer")
    models: dict[str, str] = field(
        default_factory=lambda: {
            "question": embedded.PREFIX + "reward-question",
            "answer": embedded.PREFIX + "reward-answer",
        }
    )
    """Reward checkpoint per head: a folder, or ``embedded:NAME``."""
    out: pathlib.Path | None = None
    """Where to write ``{head}.json`` head files (align2.server.models.heads format)."""
    evaluate_test: bool = False
    """Also report on the test files: once, at the end, never to choose anything."""
    val_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 16
    max_text_tokens: int = LimitsConfig.max_text_tokens
    grid: Grid = field(default_factory=Grid)


async def run(config: TrainHeadsConfig) -> list[HeadReport]:
    """Train and evaluate every head in ``config.heads``; write them when ``config.out``."""
    unknown = sorted(set(config.heads) - set(FILES))
    if unknown:
        raise ValueError(f"unknown heads {unknown}; valid: {', '.join(FILES)}")
    return [await _run_head(head, config) for head in config.heads]


@dataclass
class _Prepared:
    """One head's data and features, ready for training."""

    folder: pathlib.Path
    backbone: str
    train_set: data.PreferenceSet
    train_features: torch.Tensor
    test_set: data.PreferenceSet | None
    test_features: torch.Tensor | None
    timings: list[FeatureTiming]


async def _run_head(head: str, config: TrainHeadsConfig) -> HeadReport:
    model = config.models[head]
    ready = await _prepare(head, model, config)
    train_groups, val_groups = data.split_by_image(
        ready.train_set.groups, config.val_fraction, config.split_seed
    )
    train_pairs, val_pairs = data.pairs(train_groups), data.pairs(val_groups)
    checkpoint = read_reward_checkpoint(ready.folder)
    started = time.monotonic()
    trials = search(ready.train_features, train_pairs, val_pairs, config.grid)
    searched = time.monotonic()
    # Rounded to the checkpoint's head dtype: what the server will multiply by.
    trained = train(ready.train_features, train_pairs, trials[0].config)
    trained = trained.to(checkpoint.score_weight.dtype)
    finished = time.monotonic()
    untrained = _untrained(model, ready.folder, checkpoint.score_weight)
    splits = [
        _evaluate(
            "validation",
            ready.train_set.subset(val_groups),
            ready.train_features,
            trained,
            untrained,
        )
    ]
    if ready.test_set is not None and ready.test_features is not None:
        splits.append(_evaluate("test", ready.test_set, ready.test_features, trained, untrained))
    report = HeadReport(
        head=head,
        model=model,
        backbone=ready.backbone,
        head_dtype=str(trained.dtype).removeprefix("torch."),
        chosen=trials[0],
        trials=len(trials),
        train_groups=len(train_groups),
        train_pairs=len(train_pairs),
        splits=tuple(splits),
        features=tuple(ready.timings),
        search_seconds=searched - started,
        train_seconds=finished - searched,
    )
    if config.out is not None:
        path = heads.save(_trained_head(report, trained, ready, config), config.out)
        log.info("wrote %s", path)
    return report


async def _prepare(head: str, model: str, config: TrainHeadsConfig) -> _Prepared:
    """Resolve the checkpoint, read the files, extract (or read the cached) features."""
    folder = embedded.resolve(model, config.cache_dir)
    backbone = heads.backbone_revision(folder)
    train_name, test_name = FILES[head]
    names = [train_name, test_name] if config.evaluate_test else [train_name]
    sets = [data.load(config.data_dir / name, head) for name in names]
    cache = features.FeatureCache(config.cache_dir / "features")
    backend = TransformersScoring.load(head, ModelConfig(path=str(folder)), folder)
    try:
        extractions = [
            await features.cached_features(
                backend,
                backbone,
                s,
                cache,
                batch_size=config.batch_size,
                max_text_tokens=config.max_text_tokens,
            )
            for s in sets
        ]
    finally:
        backend.close()
    timings = [
        FeatureTiming(s.name, len(s.texts), e.seconds, e.cached, e.truncated)
        for s, e in zip(sets, extractions, strict=True)
    ]
    test_set, test_features = (sets[1], extractions[1].features) if len(sets) > 1 else (None, None)
    return _Prepared(
        folder, backbone, sets[0], extractions[0].features, test_set, test_features, timings
    )


def _untrained(model: str, folder: pathlib.Path, stored: torch.Tensor) -> torch.Tensor:
    """The untrained-head baseline: for an embedded default, the head its builder draws
    (the checkpoint now holds the trained one); for a folder, the head it holds."""
    if model.startswith(embedded.PREFIX):
        return untrained_head(folder, embedded.REWARD_SEEDS[model.removeprefix(embedded.PREFIX)])
    return stored


def _evaluate(
    split: str,
    subset: data.PreferenceSet,
    rows: torch.Tensor,
    trained: torch.Tensor,
    untrained: torch.Tensor,
) -> SplitResult:
    pairs = data.pairs(subset.groups)
    return SplitResult(
        split=split,
        file=subset.name,
        groups=len(subset.groups),
        pairs=len(pairs),
        trained=pairwise_accuracy(head_scores(rows, trained), pairs),
        untrained=pairwise_accuracy(head_scores(rows, untrained), pairs),
        longer=pairwise_accuracy(length_scores(subset.texts), pairs),
    )


def _trained_head(
    report: HeadReport, weight: torch.Tensor, ready: _Prepared, config: TrainHeadsConfig
) -> heads.TrainedHead:
    """The head file, with what it was trained on and how it did on validation."""
    validation = report.splits[0]
    return heads.TrainedHead.from_tensor(
        report.head,
        weight,
        backbone_revision=ready.backbone,
        template_version=TEMPLATE_VERSION,
        provenance={
            "tool": "align2 train-heads",
            "train_file": ready.train_set.name,
            "train_sha256": ready.train_set.sha256,
            "validation": {
                "fraction_of_images": config.val_fraction,
                "split_seed": config.split_seed,
                **dataclasses.asdict(validation),
            },
            "hyperparameters": dataclasses.asdict(report.chosen.config),
            "placeholder_image": features.PLACEHOLDER,
        },
    )
