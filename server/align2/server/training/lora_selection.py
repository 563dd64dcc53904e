"""How ``align2 train-lora`` chooses a head's learning rate and epoch (never by a test file).

Two ways, per head (:class:`Selection`):

- **one held-out split** (``folds == 0``): a fraction of the images is held out
  (data.split_by_image); each rate of the grid trains from the same start on the rest, and
  the (rate, epoch) with the best validation accuracy is the adapter kept;
- **k-fold cross-validation by image** (``folds >= 2``), for a training file too small to
  spare one split: the images are dealt into k folds (data.folds_by_image); for each rate,
  each fold is scored by a run trained from the same start on the other folds, after every
  epoch; the (rate, epoch) whose out-of-fold scores order the most pairs of the whole file
  right is chosen, and the adapter is then trained from that start on every image for that
  many epochs.

Ties keep the earlier epoch within a rate, then the earlier rate.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align2.server.training import data, lora

log = logging.getLogger(__name__)

Start = tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
"""LoRA A and B of every adapted module, and the head: where every run begins."""


@dataclass(frozen=True)
class Selection:
    """How one head's (learning rate, epoch) is chosen."""

    learning_rates: tuple[float, ...]
    """The grid; each rate trains from the same start for ``LoraTrainConfig.epochs``."""
    folds: int = 0
    """0: one held-out split (``TrainLoraConfig.val_fraction`` of the images), the best
    epoch's adapter kept. k >= 2: k-fold cross-validation by image chooses, then the
    adapter is trained on every image."""


@dataclass(frozen=True)
class Chosen:
    trained: lora.Trained
    """The kept adapter; ``epochs``: the kept rate's accuracy by epoch (held-out or
    out-of-fold), ``best_accuracy`` that of the kept epoch."""
    train_groups: list[data.Group]
    """What the kept adapter was trained on."""
    validation: list[data.Group]
    """The held-out groups (one split), or every group (k-fold: each scored out of fold)."""


@dataclass(frozen=True)
class Runner:
    """What every run of one head shares."""

    tail: lora.Tail
    params: lora.Params
    head: torch.nn.Parameter
    start: Start
    states: Sequence[torch.Tensor]
    settings: lora.LoraTrainConfig
    """``lr`` is set per run from the grid."""

    def reset(self, rate: float, epochs: int | None = None) -> lora.LoraTrainConfig:
        """Back to the start; the settings of a run at ``rate``."""
        lora.load(self.params, self.start[0])
        with torch.no_grad():
            self.head.copy_(self.start[1])
        settings = dataclasses.replace(self.settings, lr=rate)
        if epochs is not None:
            settings = dataclasses.replace(settings, epochs=epochs)
        return settings

    def right_pairs(self, groups: list[data.Group]) -> tuple[int, int]:
        """(pairs of ``groups`` the adapter orders right now, pairs)."""
        return lora.right_pairs(self.tail, self.head, self.states, groups)


def choose(
    runner: Runner,
    groups: Sequence[data.Group],
    selection: Selection,
    *,
    val_fraction: float,
    split_seed: int,
) -> Chosen:
    if selection.folds == 0:
        train, held = data.split_by_image(groups, val_fraction, split_seed)
        return Chosen(_held_out(runner, train, held, selection), train, held)
    folds = data.folds_by_image(groups, selection.folds, split_seed)
    everything = [g for fold in folds for g in fold]  # fold by fold: the final run's order
    return Chosen(_cross_validated(runner, folds, everything, selection), everything, everything)


def _held_out(
    runner: Runner, train: list[data.Group], held: list[data.Group], selection: Selection
) -> lora.Trained:
    best: lora.Trained | None = None
    for rate in selection.learning_rates:
        log.info("learning rate %g", rate)
        settings = runner.reset(rate)
        trained = lora.train(
            runner.tail, runner.params, runner.head, runner.states, train, held, settings
        )
        if best is None or trained.best_accuracy > best.best_accuracy:
            best = trained
    assert best is not None
    return best


def _cross_validated(
    runner: Runner,
    folds: list[list[data.Group]],
    everything: list[data.Group],
    selection: Selection,
) -> lora.Trained:
    best: tuple[float, int, list[lora.Epoch]] | None = None
    for rate in selection.learning_rates:
        epochs = _out_of_fold(runner, folds, rate)
        kept = max(range(len(epochs)), key=lambda e: (epochs[e].validation, -e))
        log.info(
            "learning rate %g, %d folds: out-of-fold accuracy by epoch %s",
            rate,
            len(folds),
            ", ".join(f"{e.validation:.3f}" for e in epochs),
        )
        if best is None or epochs[kept].validation > best[2][best[1]].validation:
            best = (rate, kept, epochs)
    assert best is not None
    rate, kept, epochs = best
    settings = runner.reset(rate, epochs=kept)
    started = time.monotonic()
    for epoch, loss in lora.run_epochs(
        runner.tail, runner.params, runner.head, runner.states, everything, settings
    ):
        log.info("every image, rate %g, epoch %d of %d: loss %.4f", rate, epoch, kept, loss)
    log.info("trained on every image in %.0f s", time.monotonic() - started)
    weights, head = lora.snapshot(runner.params, runner.head)
    return lora.Trained(weights, head, kept, epochs[kept].validation, rate, epochs)


def _out_of_fold(runner: Runner, folds: list[list[data.Group]], rate: float) -> list[lora.Epoch]:
    """Per epoch (0: the start), the pairwise accuracy over every fold's pairs, each fold
    scored by the run trained on the other folds (its own scores: a text shared by images of
    two folds is one row, scored by each fold's run for that fold's pairs); the loss is the
    mean of the folds' runs, the seconds their sum."""
    epochs = runner.settings.epochs
    right, total = [0] * (epochs + 1), 0
    losses, seconds = [0.0] * (epochs + 1), [0.0] * (epochs + 1)
    for k, held in enumerate(folds):
        rest = [g for j, fold in enumerate(folds) if j != k for g in fold]
        settings = runner.reset(rate)
        got, pairs = runner.right_pairs(held)
        right[0], total = right[0] + got, total + pairs
        started = time.monotonic()
        for epoch, loss in lora.run_epochs(
            runner.tail, runner.params, runner.head, runner.states, rest, settings
        ):
            right[epoch] += runner.right_pairs(held)[0]
            losses[epoch] += loss / len(folds)
            seconds[epoch] += time.monotonic() - started
            started = time.monotonic()
            log.info(
                "rate %g, fold %d of %d, epoch %d: loss %.4f", rate, k + 1, len(folds), epoch, loss
            )
    return [
        lora.Epoch(
            e,
            losses[e] if e else float("nan"),
            right[e] / total if total else float("nan"),
            seconds[e],
        )
        for e in range(epochs + 1)
    ]
