"""The decoding loop's row bookkeeping (backends/continuous.py), on a scripted model whose
next token is its position (+100), so every token shows where a row stands. The tiny random
LM of tests/backend/test_continuous_generation.py almost never emits EOS and barely depends
on positions, so these properties are pinned here."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import torch
from transformers import DynamicCache

from align2.server.backends.base import Decoding
from align2.server.backends.continuous import DecodeLoop, Row
from align2.server.backends.decoding import Decoded

VOCAB, EOS, PAD, POISON = 1000, 999, 998, 0


class PositionModel(torch.nn.Module):
    """Next token after each row's last input: its position + 100, or EOS at position
    ``stop``; all-NaN logits after a POISON id. Records each forward's batch width."""

    def __init__(self, stop: int | None = None) -> None:
        super().__init__()
        self.stop = stop
        self.widths: list[int] = []

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **_: Any) -> Any:
        self.widths.append(input_ids.shape[0])
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for row, place in enumerate(position_ids[:, -1].tolist()):
            if int(input_ids[row, -1]) == POISON:
                logits[row, -1] = float("nan")
            else:
                logits[row, -1, EOS if place == self.stop else place + 100] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=DynamicCache())


def decode(model: PositionModel, rows: list[tuple[list[int], Decoding, int]]) -> list[Any]:
    """Run ``rows`` (prompt, decoding, budget), all joining at the same step."""
    loop = DecodeLoop(
        model,
        eos_ids=frozenset({EOS}),
        pad_id=PAD,
        device=torch.device("cpu"),
        max_rows=8,
        run_on_device=lambda forward: forward(),
        name="scripted",
    )
    results: list[Any] = [None] * len(rows)
    done = [threading.Event() for _ in rows]

    def answer(i: int) -> Any:
        def set_(value: Any) -> None:
            results[i] = value
            done[i].set()

        return set_

    try:
        with loop._lock:  # all of them join at once
            for i, (prompt, decoding, budget) in enumerate(rows):
                loop.submit(Row(prompt, decoding, budget, answer(i)))
        assert all(event.wait(10) for event in done), "a row was never answered"
    finally:
        loop.close()
    return results


GREEDY = Decoding(max_new_tokens=64)


def test_a_row_that_reaches_its_eos_ends_finished_and_the_others_go_on() -> None:
    ends, runs_out = decode(
        PositionModel(stop=5), [([1, 2, 3, 4], GREEDY, 10), ([1] * 8, GREEDY, 3)]
    )
    assert ends == Decoded([103, 104], finished=True)  # EOS at position 5, not a token
    assert runs_out == Decoded([107, 108, 109], finished=False)  # its budget


def test_a_row_that_stays_decodes_at_its_own_positions_after_a_longer_one_leaves() -> None:
    long, short = decode(PositionModel(), [([1] * 10, GREEDY, 2), ([1, 2, 3], GREEDY, 6)])
    assert long == Decoded([109, 110], finished=False)
    assert short == Decoded([102, 103, 104, 105, 106, 107], finished=False)


def test_a_row_whose_draw_fails_leaves_the_batch_at_once() -> None:
    model = PositionModel()
    sampled = Decoding(max_new_tokens=64, temperature=1.0, seed=1)
    failed, greedy = decode(model, [([5, POISON], sampled, 20), ([1, 2, 3], GREEDY, 4)])
    assert isinstance(failed, ValueError) and "not finite" in str(failed)
    assert greedy == Decoded([102, 103, 104, 105], finished=False)
    assert model.widths == [2, 1, 1, 1]  # the failed row is not decoded on


def test_a_row_with_no_budget_is_answered_empty_without_a_forward() -> None:
    model = PositionModel()
    [nothing] = decode(model, [([1, 2, 3], GREEDY, 0)])
    assert nothing == Decoded([], finished=False)
    assert model.widths == []


def test_a_sampled_row_beside_a_failing_one_draws_what_it_draws_alone() -> None:
    """The finiteness check covers every sampled row at once; its verdict is per row."""
    sampled = Decoding(max_new_tokens=64, temperature=1.0, seed=7)
    [alone] = decode(PositionModel(), [([1, 2, 3], sampled, 4)])
    failed, beside = decode(PositionModel(), [([5, POISON], sampled, 9), ([1, 2, 3], sampled, 4)])
    assert isinstance(failed, ValueError) and "not finite" in str(failed)
    assert beside == alone and len(alone.tokens) == 4
