"""The method's metric, the baselines, and the hyperparameter search on validation.

Pairwise accuracy: over every strictly ordered pair of a group (data.pairs), the fraction
whose model scores are ordered the same way; equal scores count as wrong (the model did
not order the pair). Baselines on the same pairs: the untrained head (what the embedded
default returned before training) and "the longer input is better".
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText

# The builders' own function, so the baseline cannot drift from what they build.
from align2.server.models.builders import _score_weight
from align2.server.training.bradley_terry import TrainConfig, train_checkpoints


def right_pairs(scores: torch.Tensor, pairs: torch.Tensor) -> int:
    """How many of ``pairs`` (rows better, worse) have ``scores[better] > scores[worse]``."""
    return int((scores[pairs[:, 0]] > scores[pairs[:, 1]]).sum())


def pairwise_accuracy(scores: torch.Tensor, pairs: torch.Tensor) -> float:
    """Fraction of ``pairs`` ordered right (:func:`right_pairs`); NaN when there are none."""
    if len(pairs) == 0:
        return math.nan
    return right_pairs(scores, pairs) / len(pairs)


def head_scores(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``[N]`` scores as the server computes them: float32 features times the head as
    float32 (``pooled @ head.T`` in align2.server.backends.transformers_scoring)."""
    return (features.float() @ head.float().T)[:, 0]


def length_scores(texts: Sequence[str]) -> torch.Tensor:
    """The "longer is better" heuristic: each rendered input's length in characters.

    Within a group the template's fixed parts (and, for answers, the question) are equal,
    so this orders candidates by the length of their own text.
    """
    return torch.tensor([len(t) for t in texts], dtype=torch.float64)


def untrained_head(folder: pathlib.Path, seed: int) -> torch.Tensor:
    """The head the offline builders draw for a reward checkpoint built with ``seed``:
    the embedded default's head before training, reproduced for the baseline."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
    return _score_weight(model, seed)


@dataclass(frozen=True)
class Grid:
    """The search space, in order of preference among equal accuracies (see _preference).

    L2 spans from none (the unpenalised fit overfits: 0.70 train, 0.52 validation accuracy
    on the question data) to so much that the head is the limit direction (the mean of
    the standardised pair differences), where validation accuracy plateaus. Adam reaches
    the exact optimum of every L2 here within 400 steps (checked against L-BFGS).
    """

    l2: tuple[float, ...] = (1000.0, 100.0, 10.0, 1.0, 0.1, 0.01, 0.0)
    lr: tuple[float, ...] = (0.01, 0.1)
    epochs: tuple[int, ...] = (25, 50, 100, 200, 400)

    @property
    def size(self) -> int:
        return len(self.l2) * len(self.lr) * len(self.epochs)


@dataclass(frozen=True)
class Trial:
    config: TrainConfig
    accuracy: float
    """Pairwise accuracy on the validation pairs."""


def search(
    features: torch.Tensor, train_pairs: torch.Tensor, val_pairs: torch.Tensor, grid: Grid
) -> list[Trial]:
    """Every configuration of ``grid``, trained on ``train_pairs``, scored on ``val_pairs``;
    the best first (highest accuracy; among equals the simpler head, see _preference)."""
    trials: list[Trial] = []
    for l2 in grid.l2:
        for lr in grid.lr:
            heads = train_checkpoints(features, train_pairs, l2, lr, grid.epochs)
            trials.extend(
                Trial(
                    TrainConfig(l2, lr, epochs),
                    pairwise_accuracy(head_scores(features, h), val_pairs),
                )
                for epochs, h in heads.items()
            )
    return sorted(trials, key=lambda t: (-t.accuracy, *_preference(t.config, grid)))


def _preference(config: TrainConfig, grid: Grid) -> tuple[int, int, int]:
    """Among equal accuracies prefer the simpler head: fewer epochs, more L2, smaller lr."""
    return grid.epochs.index(config.epochs), grid.l2.index(config.l2), grid.lr.index(config.lr)
