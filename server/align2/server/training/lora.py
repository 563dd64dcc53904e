"""LoRA + score head, Bradley-Terry, on the top decoder layers of a served reward model.

The method trains its reward models as LoRA adapters on every linear layer of the language
model plus a scalar head, with the Bradley-Terry loss over human-ranked pairs. Here the
same adapter and loss are trained on the TOP ``layers`` decoder layers only (a budget: a
full pass of backpropagation through a 135M model over the data takes this CPU hours, the
top layers minutes). Below the adapted layers nothing trains, so the hidden states that
enter the first adapted layer are fixed: they are computed ONCE by the server's own
forward (a hook on that layer while :meth:`ScoringBackend.features` runs, exactly the
inputs a served score starts from) and training runs the top layers on them.

:class:`Tail` is that upper part of the language model: the server's own modules (the
decoder layers with the PEFT adapter injected, the final norm, the rotary embedding), run
as ``LlamaModel.forward`` runs them, then the head at the last non-padding position. Its
scores equal the server's for the same adapter and head (checked on the first batch of
every run, and by tests).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from align2.server.training import evaluate
from align2.server.training.data import Group, pairs
from align2.server.training.evaluate import pairwise_accuracy

log = logging.getLogger(__name__)


class Tail:
    """Decoder layers ``first..`` of ``language_model`` + norm + head, on cached inputs."""

    def __init__(self, language_model: Any, first: int) -> None:
        self.model = language_model
        self.layers = list(language_model.layers)[first:]

    def pooled(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Final hidden state ``[B, hidden]`` at each input's last position; ``states``: the
        inputs of layer ``first``, ``[L_i, hidden]`` each (no padding)."""
        lengths = torch.tensor([len(s) for s in states])
        longest = int(lengths.max())
        hidden = states[0].new_zeros(len(states), longest, states[0].shape[-1])
        mask = torch.zeros(len(states), longest, dtype=torch.long)
        for row, s in enumerate(states):
            hidden[row, : len(s)] = s
            mask[row, : len(s)] = 1
        position_ids = torch.arange(longest).unsqueeze(0)
        causal = create_causal_mask(
            config=self.model.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        embeddings = self.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=causal,
                position_embeddings=embeddings,
                position_ids=position_ids,
            )
        hidden = self.model.norm(hidden)
        return hidden[torch.arange(len(states)), lengths - 1].float()


@dataclass(frozen=True)
class LoraTrainConfig:
    """Hyperparameters of one training run (chosen on validation, never on test)."""

    lr: float = 5e-4
    """train-lora sets it from its grid (TrainLoraConfig.learning_rates)."""
    epochs: int = 3
    groups_per_step: int = 4
    """Groups (an image's candidates, or a turn's) per optimiser step: the pairs of a group
    are always in the same step."""
    seed: int = 0
    bf16: bool = True
    """Training steps under bfloat16 autocast; validation, the reports and the served check
    are float32. Why: a one-off check on this machine (AMX), not a bench/ figure: one step
    of 28 inputs over 8 layers took 3.6 s against 6.8 s in float32, both under load."""


@dataclass
class Epoch:
    epoch: int
    loss: float
    validation: float
    seconds: float


@dataclass
class Trained:
    """The parameters after the best epoch (by validation accuracy) and every epoch's log."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: torch.Tensor
    best_epoch: int
    best_accuracy: float
    lr: float
    epochs: list[Epoch]


Params = dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]
"""Original module name -> the LoRA A and B parameters trained in place."""


def run_epochs(
    tail: Tail,
    params: Params,
    head: torch.nn.Parameter,
    states: Sequence[torch.Tensor],
    groups: Sequence[Group],
    config: LoraTrainConfig,
) -> Iterator[tuple[int, float]]:
    """Bradley-Terry over the pairs of ``groups`` (rows index ``states``), ``config.epochs``
    epochs; ``params`` and ``head`` are updated in place, and after each epoch this yields
    (epoch, mean loss) so that the caller can evaluate or copy them."""
    trainable = [p for pair in params.values() for p in pair] + [head]
    for p in trainable:
        p.requires_grad_(True)
    try:
        optimiser = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
        order = list(range(len(groups)))
        rng = random.Random(config.seed)
        for epoch in range(1, config.epochs + 1):
            rng.shuffle(order)
            total, steps = 0.0, 0
            for start in range(0, len(order), config.groups_per_step):
                chosen = [groups[i] for i in order[start : start + config.groups_per_step]]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    loss = _step_loss(tail, head, states, chosen)
                if loss is None:
                    continue
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total, steps = total + float(loss.detach()), steps + 1
            yield epoch, total / max(steps, 1)
    finally:
        for p in trainable:
            p.requires_grad_(False)


def snapshot(
    params: Params, head: torch.Tensor
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A copy of the LoRA A and B of every module, and of the head."""
    lora = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in params.items()}
    return lora, head.detach().clone()


def load(params: Params, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``values`` (a :func:`snapshot`'s LoRA part) into the trained parameters."""
    with torch.no_grad():
        for name, (a, b) in params.items():
            a.copy_(values[name][0])
            b.copy_(values[name][1])


def train(
    tail: Tail,
    params: Params,
    head: torch.nn.Parameter,
    states: Sequence[torch.Tensor],
    train_groups: Sequence[Group],
    val_groups: Sequence[Group],
    config: LoraTrainConfig,
    progress: Callable[[str], None] = log.info,
) -> Trained:
    """Train on ``train_groups`` (:func:`run_epochs`); keep the epoch with the best
    validation accuracy (epoch 0: the untrained adapter)."""
    best = snapshot(params, head)
    best_accuracy = accuracy(tail, head, states, val_groups)
    log_epochs = [Epoch(0, float("nan"), best_accuracy, 0.0)]
    progress(f"epoch 0: validation {best_accuracy:.3f}")
    best_epoch = 0
    started = time.monotonic()
    for epoch, loss in run_epochs(tail, params, head, states, train_groups, config):
        validation = accuracy(tail, head, states, val_groups)
        seconds, started = time.monotonic() - started, time.monotonic()
        log_epochs.append(Epoch(epoch, loss, validation, seconds))
        progress(f"epoch {epoch}: loss {loss:.4f}, validation {validation:.3f}, {seconds:.0f} s")
        if validation > best_accuracy:
            best, best_accuracy, best_epoch = snapshot(params, head), validation, epoch
    return Trained(best[0], best[1], best_epoch, best_accuracy, config.lr, log_epochs)


def _step_loss(
    tail: Tail, head: torch.Tensor, states: Sequence[torch.Tensor], groups: Sequence[Group]
) -> torch.Tensor | None:
    """Mean Bradley-Terry loss ``-log sigmoid(s_better - s_worse)`` over the groups' pairs;
    every candidate is forwarded once however many pairs it is in."""
    rows = sorted({r for g in groups for r in g.rows})
    where = {r: i for i, r in enumerate(rows)}
    found = pairs(groups)
    if len(found) == 0:
        return None
    scores = (tail.pooled([states[r] for r in rows]) @ head.T)[:, 0]
    better = scores[[where[int(r)] for r in found[:, 0]]]
    worse = scores[[where[int(r)] for r in found[:, 1]]]
    return -F.logsigmoid(better - worse).mean()


def scores_of(
    tail: Tail, head: torch.Tensor, states: Sequence[torch.Tensor], rows: Sequence[int]
) -> dict[int, float]:
    """Scores of ``rows`` (no gradients), a few at a time, longest first."""
    out: dict[int, float] = {}
    ordered = sorted(rows, key=lambda r: -len(states[r]))
    with torch.no_grad():
        for start in range(0, len(ordered), 16):
            chosen = ordered[start : start + 16]
            values = (tail.pooled([states[r] for r in chosen]) @ head.float().T)[:, 0]
            out.update(zip(chosen, values.tolist(), strict=True))
    return out


def accuracy(
    tail: Tail, head: torch.Tensor, states: Sequence[torch.Tensor], groups: Sequence[Group]
) -> float:
    """Pairwise accuracy over ``groups`` of the scores ``tail`` and ``head`` give."""
    return pairwise_accuracy(_dense_scores(tail, head, states, groups), pairs(groups))


def right_pairs(
    tail: Tail, head: torch.Tensor, states: Sequence[torch.Tensor], groups: Sequence[Group]
) -> tuple[int, int]:
    """(pairs of ``groups`` those scores order right, pairs): :func:`accuracy` as counts,
    for pooling the accuracy of parts scored by different runs."""
    found = pairs(groups)
    return evaluate.right_pairs(_dense_scores(tail, head, states, groups), found), len(found)


def _dense_scores(
    tail: Tail, head: torch.Tensor, states: Sequence[torch.Tensor], groups: Sequence[Group]
) -> torch.Tensor:
    """``[len(states)]``: the scores of the rows of ``groups``, 0 elsewhere."""
    rows = sorted({r for g in groups for r in g.rows})
    dense = torch.zeros(len(states))
    for r, s in scores_of(tail, head, states, rows).items():
        dense[r] = s
    return dense
