"""Continuous batching on transformers (``models.NAME.continuous_rows``): a request joins the
running batch at the next step, a finished one leaves, and every request gets what the
batched backend gives it alone, on a tiny random Llama.

Where a test needs a generation that runs its whole budget, the LM head's EOS row is zeroed
(bench/gpu_align.py does the same): the EOS logit is then exactly 0, below the largest of
the other random logits, so greedy decoding never stops early.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from align2.server.backends.base import ChoiceRequest, Decoding, GenerationRequest, Message
from align2.server.backends.continuous import Choice, DecodeLoop, Row
from align2.server.backends.transformers_generation import (
    ContinuousGeneration,
    TransformersGeneration,
)
from align2.server.config import BatchingConfig, ModelConfig
from align2.server.core.llm import GenerationRuntime
from align2.server.core.priority import Priority
from align2.server.errors import BackendError, DeviceOutOfMemory

GREEDY = Decoding(max_new_tokens=12)


def user(text: str) -> list[Message]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


PROMPTS = [
    user("hi"),
    user("What is the colour of the bus in the picture?"),
    user("Two dogs."),
    user("Describe the kitchen, the table and everything on it, in one sentence."),
]


def load(folder: pathlib.Path, rows: int = 0) -> Any:
    config = ModelConfig(path=str(folder), continuous_rows=rows)
    return TransformersGeneration.load("llm", config, folder)


@pytest.fixture(scope="module")
def batched(tiny_llm: pathlib.Path) -> TransformersGeneration:
    return load(tiny_llm)


@pytest.fixture
def continuous(tiny_llm: pathlib.Path) -> Iterator[ContinuousGeneration]:
    backend = load(tiny_llm, rows=8)
    assert isinstance(backend, ContinuousGeneration) and backend.continuous
    yield backend
    backend.close()


def never_ends(backend: TransformersGeneration) -> None:
    eos = backend._tokenizer.eos_token_id
    with torch.no_grad():
        backend._model.lm_head.weight[eos].zero_()


def alone(backend: TransformersGeneration, request: GenerationRequest) -> Any:
    return asyncio.run(backend.generate([request]))[0]


def test_together_and_staggered_each_gets_what_it_gets_alone(
    batched: TransformersGeneration, continuous: ContinuousGeneration
) -> None:
    decodings = [
        GREEDY,
        Decoding(max_new_tokens=5),
        Decoding(max_new_tokens=16, temperature=1.0, seed=3),
        Decoding(max_new_tokens=9, temperature=0.7, top_p=0.8, seed=11),
    ]
    requests = [GenerationRequest(p, d) for p, d in zip(PROMPTS, decodings, strict=True)]
    want = [alone(batched, r) for r in requests]
    assert asyncio.run(continuous.generate(requests)) == want

    async def staggered() -> list[Any]:
        tasks = []
        for request in requests:  # each arrives while the earlier ones decode
            tasks.append(asyncio.ensure_future(continuous.generate([request])))
            await asyncio.sleep(0.01)
        return [made for [made] in await asyncio.gather(*tasks)]

    assert asyncio.run(staggered()) == want


def test_a_request_joins_the_running_batch_and_leaves_before_it_ends(
    tiny_llm: pathlib.Path,
) -> None:
    backend = load(tiny_llm, rows=8)
    never_ends(backend)
    long = GenerationRequest(PROMPTS[3], Decoding(max_new_tokens=400))
    short = GenerationRequest(PROMPTS[0], Decoding(max_new_tokens=3))

    async def run() -> tuple[Any, Any, bool]:
        running = asyncio.ensure_future(backend.generate([long]))
        while backend._loop.steps < 5:  # noqa: ASYNC110 - the long one is decoding
            await asyncio.sleep(0.005)
        [made] = await backend.generate([short])
        long_still_running = not running.done()
        [long_made] = await running
        return made, long_made, long_still_running

    try:
        made, long_made, long_still_running = asyncio.run(run())
    finally:
        backend.close()
    assert long_still_running  # the short one did not wait for the long one to end
    assert backend._loop.joined_running == 1
    assert made.generated_tokens == 3 and long_made.generated_tokens == 400
    batched = load(tiny_llm)
    never_ends(batched)
    assert [made, long_made] == [alone(batched, short), alone(batched, long)]


def test_when_the_longest_row_leaves_its_padding_is_cut_from_the_cache(
    tiny_llm: pathlib.Path,
) -> None:
    """Columns only the departed row used are cut: the last step attends over the short
    row's own tokens, not the long prompt's width; and it still gets what it gets alone."""
    backend = load(tiny_llm, rows=8)
    never_ends(backend)
    long = GenerationRequest(PROMPTS[3], Decoding(max_new_tokens=2))
    short = GenerationRequest(PROMPTS[0], Decoding(max_new_tokens=10))
    widths: list[int] = []
    hook = backend._model.register_forward_pre_hook(
        lambda _m, _a, kwargs: widths.append(kwargs["attention_mask"].shape[1]), with_kwargs=True
    )
    try:
        made = asyncio.run(backend.generate([long, short]))
    finally:
        hook.remove()
        backend.close()
    long_ids, short_ids = (len(backend._prompts.ids(r.messages)) for r in (long, short))
    assert long_ids > short_ids + 9 and max(widths) > long_ids  # the long row decoded
    # Whether both joined at once or not, the short row's last step feeds its 9th token
    # (its 10th and last is not fed): the long prompt's columns are gone by then.
    assert widths[-1] == short_ids + 9
    batched = load(tiny_llm)
    never_ends(batched)
    assert made == [alone(batched, long), alone(batched, short)]


def test_cancelling_a_caller_stops_its_row(tiny_llm: pathlib.Path) -> None:
    backend = load(tiny_llm, rows=8)
    never_ends(backend)

    async def run() -> int:
        task = asyncio.ensure_future(
            backend.generate([GenerationRequest(PROMPTS[1], Decoding(max_new_tokens=2000))])
        )
        while backend._loop.steps < 3:  # noqa: ASYNC110 - a counter of the loop's thread
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        return backend._loop.steps

    try:
        steps = asyncio.run(run())
        time.sleep(0.2)
        assert backend._loop.steps == steps < 2000  # idle: the row left
    finally:
        backend.close()


def test_a_prefill_whose_callers_all_left_stops_within_a_layer(tiny_llm: pathlib.Path) -> None:
    """The joining rows' prefill ends at its next layer once none of their callers waits;
    the loop goes on, and the next request gets what it gets alone."""
    backend = load(tiny_llm, rows=8)
    layers = list(backend._model.model.layers)
    started: list[torch.nn.Module] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(backend.generate([GenerationRequest(PROMPTS[1], GREEDY)]))

        def leave(module: torch.nn.Module, _args: Any) -> None:
            started.append(module)
            if len(started) == 1:  # the caller leaves while the first layer runs
                loop.call_soon_threadsafe(task.cancel)
                time.sleep(0.5)  # its cancellation marks the row meanwhile

        hooks = [layer.register_forward_pre_hook(leave) for layer in layers]
        try:
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(1.0)  # the device thread ends the prefill
        finally:
            for hook in hooks:
                hook.remove()

    try:
        asyncio.run(run())
        assert started == layers[:1] and backend._loop.steps == 0
        [after] = asyncio.run(backend.generate([GenerationRequest(PROMPTS[1], GREEDY)]))
        [batched] = asyncio.run(load(tiny_llm).generate([GenerationRequest(PROMPTS[1], GREEDY)]))
        assert after == batched
    finally:
        backend.close()


def test_at_most_max_rows_decode_together_and_the_rest_wait_in_order(
    tiny_llm: pathlib.Path, batched: TransformersGeneration
) -> None:
    backend = load(tiny_llm, rows=2)
    widths: list[int] = []
    model = backend._model
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    requests = [GenerationRequest(p, GREEDY) for p in PROMPTS]
    try:
        made = asyncio.run(backend.generate(requests))
    finally:
        hook.remove()
        backend.close()
    assert max(widths) == 2
    assert made == [alone(batched, r) for r in requests]


def test_review_choices_run_between_steps_as_the_batched_backend_gives_them(
    batched: TransformersGeneration, continuous: ContinuousGeneration
) -> None:
    choice = ChoiceRequest(user("Which is better, A or B?"), ("A", "B"))

    async def run() -> tuple[Any, Any]:
        generating = asyncio.ensure_future(
            continuous.generate([GenerationRequest(PROMPTS[3], Decoding(max_new_tokens=30))])
        )
        chosen = await continuous.choose([choice, choice])
        await generating
        return chosen, generating.result()

    chosen, _ = asyncio.run(run())
    [want] = asyncio.run(batched.choose([choice]))
    assert chosen == [pytest.approx(want, abs=1e-6)] * 2


def test_a_row_whose_draw_fails_fails_alone(
    batched: TransformersGeneration, continuous: ContinuousGeneration
) -> None:
    """A denormal temperature makes the probabilities NaN (the server refuses it; forced
    here at the backend seam): that row fails, its batch-mates get their text."""
    bad = GenerationRequest(PROMPTS[1], Decoding(max_new_tokens=8, temperature=1e-45, seed=1))
    greedy = [GenerationRequest(p, GREEDY) for p in (PROMPTS[0], PROMPTS[2])]

    async def run() -> list[Any]:
        return await asyncio.gather(
            *(continuous.generate([r]) for r in (greedy[0], bad, greedy[1])),
            return_exceptions=True,
        )

    first, failed, last = asyncio.run(run())
    assert isinstance(failed, BackendError) and "probability tensor contains" in failed.message
    assert [first[0], last[0]] == [alone(batched, r) for r in greedy]


def test_a_joining_prefill_that_fails_fails_only_its_own_row(tiny_llm: pathlib.Path) -> None:
    """Out of memory on one joining row's long prompt (injected): the row already decoding
    and the short row that joined with it get what they get alone; only the long one fails,
    with the device's error."""
    backend = load(tiny_llm, rows=8)
    never_ends(backend)
    model = backend._model
    real_forward = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        if kwargs.get("past_key_values") is None and ids.shape[1] > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (injected: a long prefill)")
        return real_forward(*args, **kwargs)

    running = GenerationRequest(PROMPTS[0], Decoding(max_new_tokens=60))
    short = GenerationRequest(PROMPTS[2], GREEDY)
    long = GenerationRequest(user("long " * 150), GREEDY)

    async def run() -> list[Any]:
        first = asyncio.ensure_future(backend.generate([running]))
        while backend._loop.steps < 5:  # noqa: ASYNC110 - the first one is decoding
            await asyncio.sleep(0.005)
        with backend._loop._lock:  # both join at the same step
            joined = [asyncio.ensure_future(backend.generate([r])) for r in (long, short)]
            await asyncio.sleep(0.05)
        return await asyncio.gather(first, *joined, return_exceptions=True)

    model.forward = forward
    try:
        [made], failed, [short_made] = asyncio.run(run())
    finally:
        backend.close()
    assert isinstance(failed, DeviceOutOfMemory)
    assert backend._loop.joined_running == 1
    batched = load(tiny_llm)
    never_ends(batched)
    assert [made, short_made] == [alone(batched, running), alone(batched, short)]


def test_a_device_error_in_a_review_choice_is_classified_and_the_loop_goes_on(
    tiny_llm: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA an earlier kernel's fault surfaces at the next sync, here the choice's copy
    to the host (injected): the choice fails with the fatal device error the core turns
    into NOT_SERVING, and the loop's thread still answers the next request."""
    from align2.server.backends import continuous as module

    class Faulted:
        def cpu(self) -> torch.Tensor:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    real = module.last_logits
    calls: list[int] = []

    def last_logits(*args: Any) -> Any:
        calls.append(1)
        return Faulted() if len(calls) == 1 else real(*args)

    monkeypatch.setattr(module, "last_logits", last_logits)
    backend = load(tiny_llm, rows=4)
    choice = ChoiceRequest(user("Which is better, A or B?"), ("A", "B"))
    try:
        with pytest.raises(BackendError) as failed:
            asyncio.run(backend.choose([choice]))
        assert failed.value.fatal and "illegal memory access" in failed.value.message
        [made] = asyncio.run(backend.generate([GenerationRequest(PROMPTS[1], GREEDY)]))
        chosen = asyncio.run(backend.choose([choice]))
    finally:
        backend.close()
    batched = load(tiny_llm)
    assert made == alone(batched, GenerationRequest(PROMPTS[1], GREEDY))
    assert chosen == [pytest.approx(asyncio.run(batched.choose([choice]))[0], abs=1e-6)]


def test_the_core_sends_each_request_straight_to_the_loop(
    continuous: ContinuousGeneration, batched: TransformersGeneration
) -> None:
    """Through GenerationRuntime: no batcher in front (continuous), results as alone."""
    requests = [GenerationRequest(p, GREEDY) for p in PROMPTS]

    async def run() -> list[Any]:
        runtime = GenerationRuntime(continuous, BatchingConfig(), max_inflight=8)
        runtime.start()
        try:
            slots = runtime.reserve(len(requests))
            outcomes = await asyncio.gather(
                *(
                    runtime.generate(r, 64, slots, deadline=None, priority=Priority.BULK)
                    for r in requests
                )
            )
            return [o.value for o in outcomes]
        finally:
            await runtime.close()

    assert asyncio.run(run()) == [alone(batched, r) for r in requests]


def test_closing_fails_everything_still_waiting_choices_included() -> None:
    """A generation running, another and a review choice waiting behind it: close ends all
    three with an error (none is left without an answer)."""
    gate, entered = threading.Event(), threading.Event()

    class Blocking(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
            entered.set()
            gate.wait(5)
            logits = torch.zeros(*input_ids.shape, 8)
            return SimpleNamespace(logits=logits, past_key_values=DynamicCache())

    answers: list[Any] = []
    loop = DecodeLoop(
        Blocking(),
        eos_ids=frozenset({7}),
        pad_id=0,
        device=torch.device("cpu"),
        max_rows=4,
        run_on_device=lambda forward: forward(),
        name="t",
    )
    loop.submit(Row([1, 2], GREEDY, 50, answers.append))
    assert entered.wait(5)  # its prefill runs (and waits at the gate)
    loop.submit(Choice([3], answers.append))
    loop.submit(Row([4], GREEDY, 5, answers.append))
    closer = threading.Thread(target=loop.close)
    closer.start()
    deadline = time.monotonic() + 5
    while not loop.closed and time.monotonic() < deadline:  # close() marks it, then joins
        time.sleep(0.01)
    assert loop.closed
    gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert len(answers) == 3
    assert all(isinstance(a, RuntimeError) and "closed" in str(a) for a in answers)
