"""How train-lora chooses (rate, epoch): k-fold never scores a fold with a run that trained
on it, and the kept adapter is trained on every image for the chosen epochs.

A unit test of training.lora_selection alone: the "tail" is a linear stand-in (the last
position's input as the pooled feature), so only the head trains, with the real
Bradley-Terry loop (training.lora.run_epochs)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from align2.server.training import data, lora, lora_selection
from align2.server.training.evaluate import pairwise_accuracy


class LinearTail:
    def pooled(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([s[-1] for s in states]).float()


def problem(images: int = 9) -> tuple[list[torch.Tensor], list[data.Group]]:
    """One group of 3 candidates per image; feature 0 of a candidate is its human score
    (learnable), the rest noise."""
    generator = torch.Generator().manual_seed(0)
    states, groups = [], []
    for i in range(images):
        scores = (0.2, 0.9, 0.5) if i % 2 else (0.7, 0.1, 0.4)
        rows = []
        for score in scores:
            features = torch.randn(2, 4, generator=generator)
            features[-1, 0] = score
            rows.append(len(states))
            states.append(features)
        groups.append(data.Group(f"img{i}", tuple(rows), scores))
    return states, groups


def runner(states: list[torch.Tensor], epochs: int = 3) -> lora_selection.Runner:
    start = ({}, torch.tensor([[-1.0, 0.3, 0.2, -0.1]]))  # orders the pairs wrongly
    return lora_selection.Runner(
        tail=LinearTail(),  # type: ignore[arg-type]
        params={},
        head=torch.nn.Parameter(start[1].clone()),
        start=start,
        states=states,
        settings=lora.LoraTrainConfig(lr=0.1, epochs=epochs, groups_per_step=2, bf16=False),
    )


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """The calls, in order: ("score", rows scored) and ("train", (images, epochs))."""
    calls: list[tuple[str, object]] = []
    real_run, real_right = lora.run_epochs, lora_selection.Runner.right_pairs

    def run_epochs(tail, params, head, states, groups, config):  # type: ignore[no-untyped-def]
        calls.append(("train", ({g.image for g in groups}, config.epochs)))
        return real_run(tail, params, head, states, groups, config)

    def right_pairs(self, groups):  # type: ignore[no-untyped-def]
        calls.append(("score", tuple(sorted({r for g in groups for r in g.rows}))))
        return real_right(self, groups)

    monkeypatch.setattr(lora, "run_epochs", run_epochs)
    monkeypatch.setattr(lora_selection.Runner, "right_pairs", right_pairs)
    return calls


def test_k_fold_scores_each_fold_with_a_run_that_never_saw_it(recorded) -> None:
    states, groups = problem()
    selection = lora_selection.Selection((0.1,), folds=3)
    chosen = lora_selection.choose(
        runner(states), groups, selection, val_fraction=0.2, split_seed=0
    )
    image_of = {r: g.image for g in groups for r in g.rows}
    trains = [i for i, (kind, _) in enumerate(recorded) if kind == "train"]
    assert len(trains) == 4  # one per fold, then every image
    scored: list[int] = []
    for fold, at in enumerate(trains[:3]):
        rows = recorded[at - 1][1]  # the fold's epoch-0 scores come right before its run
        trained_on, epochs = recorded[at][1]
        assert epochs == 3
        assert trained_on.isdisjoint(image_of[r] for r in rows), fold
        assert trained_on | {image_of[r] for r in rows} == {g.image for g in groups}
        # Scored after every epoch, with the same rows, before the next fold starts.
        end = trains[fold + 1] - (1 if fold < 2 else 0)  # the next fold's epoch 0
        following = recorded[at + 1 : end]
        assert following == [("score", rows)] * 3
        scored += rows
    assert sorted(scored) == sorted(image_of)  # each row scored by exactly one fold
    # Out of fold, the learnable feature is learnt: the kept epoch beats the start.
    accuracies = [e.validation for e in chosen.trained.epochs]
    assert accuracies[0] == pairwise_accuracy(
        (torch.stack([s[-1] for s in states]) @ runner(states).start[1].T)[:, 0],
        data.pairs(groups),
    )
    assert accuracies[chosen.trained.best_epoch] == max(accuracies) > accuracies[0]
    # The kept adapter: from the start, every image, the chosen number of epochs.
    assert recorded[trains[3]][1] == ({g.image for g in groups}, chosen.trained.best_epoch)
    assert recorded[trains[3] + 1 :] == []
    assert sorted(g.rows for g in chosen.train_groups) == sorted(g.rows for g in groups)
    assert chosen.validation == chosen.train_groups
    # ... and it is what that run gives from the start (not from where the folds left off).
    again = runner(states)
    settings = again.reset(0.1, epochs=chosen.trained.best_epoch)
    for _ in lora.run_epochs(again.tail, {}, again.head, states, chosen.train_groups, settings):
        pass
    assert torch.equal(chosen.trained.head, again.head.detach())


@pytest.mark.parametrize(
    ("curves", "rate", "epoch"),
    [
        # A tie across rates keeps the earlier rate, even where the later one is earlier.
        ({0.1: [0.5, 0.6, 0.7, 0.7], 0.2: [0.5, 0.7, 0.6, 0.6]}, 0.1, 2),
        ({0.1: [0.5, 0.6, 0.7, 0.7], 0.2: [0.5, 0.71, 0.6, 0.6]}, 0.2, 1),  # strictly better
        ({0.1: [0.5, 0.4, 0.4, 0.3], 0.2: [0.5, 0.5, 0.2, 0.2]}, 0.1, 0),  # the start
    ],
)
def test_k_fold_ties_keep_the_earlier_epoch_then_the_earlier_rate(
    monkeypatch: pytest.MonkeyPatch, curves: dict[float, list[float]], rate: float, epoch: int
) -> None:
    def out_of_fold(runner, folds, rate):  # type: ignore[no-untyped-def]
        return [lora.Epoch(e, 0.0, a, 0.0) for e, a in enumerate(curves[rate])]

    monkeypatch.setattr(lora_selection, "_out_of_fold", out_of_fold)
    states, groups = problem()
    chosen = lora_selection.choose(
        runner(states),
        groups,
        lora_selection.Selection(tuple(curves), folds=3),
        val_fraction=0.2,
        split_seed=0,
    )
    assert (chosen.trained.lr, chosen.trained.best_epoch) == (rate, epoch)
    assert chosen.trained.best_accuracy == curves[rate][epoch]


def test_a_text_shared_by_two_folds_is_scored_by_each_fold_own_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Identical renderings share one row: images of two folds may hold the same row, and
    each fold's pairs must be ordered by the scores of that fold's run."""
    groups = [
        data.Group("a", (0, 1), (0.9, 0.1)),  # row 0 better than row 1
        data.Group("b", (1, 2), (0.9, 0.1)),  # row 1 (shared) better than row 2
    ]
    folds = [[groups[0]], [groups[1]]]
    # Each fold's run orders its own fold right and the other fold wrong.
    by_fold = [torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0.0, 2.0, 1.0])]
    current = [0]

    def scores_of(tail, head, states, rows):  # type: ignore[no-untyped-def]
        return {r: float(by_fold[current[0]][r]) for r in rows}  # the current run's

    def run_epochs(tail, params, head, states, trained_on, config):  # type: ignore[no-untyped-def]
        current[0] = 1 if trained_on == folds[0] else 0  # the run for the other fold
        yield 1, 0.0

    monkeypatch.setattr(lora, "scores_of", scores_of)
    monkeypatch.setattr(lora, "run_epochs", run_epochs)
    shared = runner([torch.zeros(2, 4)] * 3, epochs=1)
    epochs = lora_selection._out_of_fold(shared, folds, 0.1)
    assert [e.validation for e in epochs] == [0.5, 1.0]  # epoch 0 before any run: fold 0's


def test_one_split_trains_on_the_rest_and_keeps_the_best_held_out_epoch(recorded) -> None:
    states, groups = problem()
    chosen = lora_selection.choose(
        runner(states),
        groups,
        lora_selection.Selection((0.01, 0.1)),
        val_fraction=0.34,
        split_seed=0,
    )
    held = {g.image for g in chosen.validation}
    assert len(held) == 3
    assert [call for call in recorded if call[0] == "train"] == [
        ("train", ({g.image for g in chosen.train_groups}, 3))
    ] * 2  # each rate from the same start on the same images
    assert held.isdisjoint(g.image for g in chosen.train_groups)
    accuracies = [e.validation for e in chosen.trained.epochs]
    assert accuracies[chosen.trained.best_epoch] == max(accuracies)
