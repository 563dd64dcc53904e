"""Bradley-Terry training of one linear score head on frozen features.

The model is the method's: ``P(a preferred to b) = sigmoid(s(a) - s(b))`` with
``s(x) = features(x) @ w``, loss ``-logsigmoid(s_better - s_worse)`` averaged over pairs,
plus ``l2 / 2 * ||v||^2`` on the head in standardised units (below). The head has no bias
(a bias cancels in every difference), so it stays ``score.weight`` of shape ``[1, hidden]``.

Why standardise: hidden-state dimensions differ in scale by orders of magnitude, which
makes one learning rate and one penalty fit badly. Training runs on differences divided by
each dimension's standard deviation and the scale is folded back into ``w`` at the end, so
nothing extra ships (a mean shift would cancel in the differences anyway).

Deterministic: full batch, zero initialisation, Adam, no sampling, one CPU thread and
torch's deterministic algorithms on; the same inputs on the same machine and library
versions give the same head bit for bit. One thread is also the fastest here: the steps
are small matrix-vector products, which a second thread slows down (measured 2-5x on a
2-core machine). float32, as the features are; an 800-step run over 8k pairs takes ~2 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TrainConfig:
    """What a linear head allows to tune."""

    l2: float = 1e-2
    """Penalty on the standardised head (weight decay); 0 for none."""
    lr: float = 0.05
    """Adam's learning rate."""
    epochs: int = 200
    """Full-batch steps."""


def train(features: torch.Tensor, pairs: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The head ``[1, hidden]`` (float32) after ``config.epochs`` steps."""
    return train_checkpoints(features, pairs, config.l2, config.lr, [config.epochs])[config.epochs]


def train_checkpoints(
    features: torch.Tensor,
    pairs: torch.Tensor,
    l2: float,
    lr: float,
    epochs: Sequence[int],
) -> dict[int, torch.Tensor]:
    """One run, the head after each of ``epochs`` steps (float32 ``[1, hidden]`` each).

    Identical to separate runs of those lengths (the run is deterministic), at the cost of
    the longest. ``features``: ``[N, hidden]``; ``pairs``: ``[P, 2]`` rows (better, worse),
    P > 0. Raises ValueError on empty pairs or non-positive epochs.
    """
    if len(pairs) == 0:
        raise ValueError("no ordered pairs to train on")
    if min(epochs) < 1:
        raise ValueError(f"epochs must be positive, got {sorted(epochs)}")
    with _deterministic(), torch.enable_grad():
        rows = features.to(torch.float32)
        scale = _scale(rows, pairs)
        diffs = (rows[pairs[:, 0]] - rows[pairs[:, 1]]) / scale
        weight = torch.zeros(rows.shape[1], dtype=rows.dtype, requires_grad=True)
        optimiser = torch.optim.Adam([weight], lr=lr)
        heads: dict[int, torch.Tensor] = {}
        for step in range(1, max(epochs) + 1):
            optimiser.zero_grad()
            loss = F.softplus(-(diffs @ weight)).mean() + 0.5 * l2 * weight.dot(weight)
            loss.backward()
            optimiser.step()
            if step in epochs:
                heads[step] = (weight.detach() / scale).reshape(1, -1)
    return heads


def _scale(rows: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation over the rows the pairs use (1 where constant)."""
    used = rows[torch.unique(pairs)]
    std = used.std(dim=0) if len(used) > 1 else torch.ones(rows.shape[1], dtype=rows.dtype)
    return torch.where(std > 0, std, torch.ones_like(std))


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """One thread and torch's deterministic algorithms for the block (then restored)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])
