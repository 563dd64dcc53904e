"""Bradley-Terry training of one linear head and the validation search, on synthetic
features with a planted preference direction."""

from __future__ import annotations

import pytest
import torch

from align2.server.training.bradley_terry import TrainConfig, train, train_checkpoints
from align2.server.training.evaluate import Grid, head_scores, pairwise_accuracy, search

HIDDEN = 16


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with dimensions of very different scales, and the pairs a hidden true head
    orders (consecutive rows form groups of 4)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, HIDDEN)
    features = torch.randn(n, HIDDEN, generator=generator) * scales
    truth = features @ (torch.linspace(1, -1, HIDDEN) / scales)
    pairs = [
        (a, b) if truth[a] > truth[b] else (b, a)
        for start in range(0, n, 4)
        for a in range(start, start + 4)
        for b in range(a + 1, start + 4)
    ]
    return features, torch.tensor(pairs)


def test_training_is_deterministic_and_learns_the_planted_direction() -> None:
    features, pairs = synthetic(400, seed=0)
    config = TrainConfig(l2=1e-3, lr=0.1, epochs=100)
    head = train(features, pairs, config)
    assert head.shape == (1, HIDDEN) and head.dtype == torch.float32
    assert torch.equal(head, train(features, pairs, config))  # bit for bit
    held_out, held_pairs = synthetic(200, seed=1)
    assert pairwise_accuracy(head_scores(held_out, head), held_pairs) > 0.95


def test_checkpoints_equal_separate_runs_and_restore_torch_settings() -> None:
    features, pairs = synthetic(80, seed=2)
    threads = torch.get_num_threads()
    heads = train_checkpoints(features, pairs, 0.01, 0.05, [5, 20])
    assert torch.equal(heads[5], train(features, pairs, TrainConfig(0.01, 0.05, 5)))
    assert torch.equal(heads[20], train(features, pairs, TrainConfig(0.01, 0.05, 20)))
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_l2_shrinks_the_head_in_standardised_units() -> None:
    features, pairs = synthetic(80, seed=3)
    loose = train(features, pairs, TrainConfig(l2=0.0, lr=0.1, epochs=200))
    tight = train(features, pairs, TrainConfig(l2=1.0, lr=0.1, epochs=200))
    scale = features.std(dim=0)
    assert (tight * scale).norm() < 0.5 * (loose * scale).norm()


def test_no_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="no ordered pairs"):
        train(torch.zeros(3, HIDDEN), torch.empty(0, 2, dtype=torch.long), TrainConfig())


def test_search_ranks_by_validation_accuracy_then_prefers_simpler_heads() -> None:
    features, pairs = synthetic(240, seed=4)
    grid = Grid(l2=(10.0, 0.0), lr=(0.1,), epochs=(1, 50))
    trials = search(features, pairs[:200], pairs[200:], grid)
    assert len(trials) == grid.size == 4
    accuracies = [t.accuracy for t in trials]
    assert accuracies == sorted(accuracies, reverse=True)
    # One step from zero moves every coordinate by about lr, whatever the penalty, so
    # both 1-epoch heads score the same, and the larger penalty is preferred among them.
    ones = [t.config for t in trials if t.config.epochs == 1]
    assert ones == [TrainConfig(10.0, 0.1, 1), TrainConfig(0.0, 0.1, 1)]
