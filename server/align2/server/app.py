"""One align2 server: explicit lifecycle.

construct -> start(): bind the gRPC port (health NOT_SERVING), load the models, warm up
through the full Score and Align paths, then SERVING -> stop(): health NOT_SERVING, refuse
new calls, let in-flight calls finish within the grace period (a hard bound: then they are
ended with UNAVAILABLE), close the port, batchers and backends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import io
import logging
import pathlib
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from align2.client.types import Sample, Turn
from align2.server import backends, memory, metrics, threads
from align2.server.backends.base import (
    GenerationBackend,
    ModelDescription,
    ScoringBackend,
    with_settings,
)
from align2.server.config import GRPC_MAX_MS, Config, ModelConfig
from align2.server.core.align_types import AlignCall, DecodingOptions
from align2.server.core.alignment import Aligner
from align2.server.core.budget import ByteBudget
from align2.server.core.curation import Curator
from align2.server.core.lifecycle import Lifecycle, Phase
from align2.server.core.llm import GenerationRuntime
from align2.server.core.prompts import TemplateLibrary
from align2.server.core.runtime import ScoringRuntime
from align2.server.core.scoring import ScoreCall, Scorer
from align2.server.errors import ConfigError
from align2.server.models import embedded
from align2.server.transport import convert, reflection
from align2.server.transport.admission import ByteBudgetInterceptor
from align2.server.transport.health import HealthServicer, serve_health_only
from align2.server.transport.interceptors import ParseInterceptor, StatusInterceptor
from align2.server.transport.security import (
    BearerTokenInterceptor,
    read_tokens,
    server_credentials,
)
from align2.server.transport.servicer import CurationServicer
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CurationService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_ANSWER_SECONDS = 1.0
"""How long calls ended at the grace deadline get to send their answers."""


def version() -> str:
    try:
        return importlib.metadata.version("align2")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class App:
    def __init__(self, config: Config, registry: backends.Registry | None = None) -> None:
        """``registry``: the backend factories (default: the built-in backends)."""
        self.config = config
        self.registry = registry or backends.Registry()
        self.lifecycle = Lifecycle()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics: metrics.MetricsServer | None = None
        self.threads = threads.plan(config.server.torch_threads, config.batching.preprocess_workers)
        self._pool = ThreadPoolExecutor(
            self.threads.preprocess_workers, thread_name_prefix="align2-prepare"
        )
        self._runtimes: dict[str, ScoringRuntime] = {}  # by config name; shared folders share
        self._scorer = (
            Scorer(self._runtimes, config.score, config.limits, self._pool)
            if config.score.enabled
            else None
        )
        self._llms: dict[str, GenerationRuntime] = {}  # the inner LLM, by config name
        self._templates = TemplateLibrary() if config.align_enabled else None
        self._aligner = (
            Aligner(self._llms, self._templates, config.align, config.limits, self._pool)
            if self._templates is not None
            else None
        )
        self._trimmer = memory.HeapTrimmer(
            config.server.trim_idle_seconds, lambda: self.request_bytes.in_flight == 0
        )
        self.request_bytes = ByteBudget(
            config.limits.max_inflight_bytes, on_drained=self._trimmer.drained
        )
        self._curator = (
            Curator(
                self._scorer,
                self._aligner,
                config.curate,
                config.limits,
                self.lifecycle,
                budget=self.request_bytes,  # a stream's samples share Score's and Align's
                align_off=config.align_off_reason,
                scores_freed=self._trimmer.drained,  # no request bytes count seeded windows
            )
            if self._scorer is not None and config.curate_enabled
            else None
        )
        self._health = HealthServicer()
        self._health_server: grpc.aio.Server | None = None  # server.health_port
        self.health_port: int | None = None
        self._status = StatusInterceptor()  # holds the calls in flight, for stop()
        self._server: grpc.aio.Server | None = None

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        for name in self._scoring_model_names():
            backends.check_backend(name, self.config.models[name], self.registry.scoring)
        self._check_align()
        await self._bind()
        try:
            await self._load_models()
            await self._warm_up()
        except BaseException:
            self.lifecycle.phase = Phase.FAILED
            raise
        self.lifecycle.phase = Phase.SERVING
        await self._set_health(_SERVING)
        log.info(
            "align2 serving: grpc port %s, metrics port %s, health port %s",
            self.port,
            self.metrics_port,
            self.health_port,
        )

    async def _bind(self) -> None:
        size = self.config.limits.max_message_bytes
        security = self.config.security
        interceptors: list[grpc.aio.ServerInterceptor] = [self._status]
        tokens = read_tokens(security)
        if tokens:  # inside StatusInterceptor, so refusals are counted and logged
            interceptors.append(BearerTokenInterceptor(tokens, open_health=security.open_health))
        # Request bytes next: an unauthenticated call is refused first, and the bytes of one
        # that does not fit are never parsed (ByteBudgetInterceptor wraps Parse's parser).
        interceptors.append(ByteBudgetInterceptor(self.request_bytes))
        interceptors.append(ParseInterceptor())  # last: after the token check
        credentials = server_credentials(security)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", size),
                # A response is not refused for its size after its work is done: an Align
                # response holds each text twice (original and rewrite) and can be twice
                # its request; what the server sends is bounded by what it admitted.
                ("grpc.max_send_message_length", -1),
                ("grpc.max_concurrent_streams", self.config.limits.max_streams),
                # With overload protection (gRPC's default), a stream the client already
                # counts as closed still counts here until it is freed, so a client at the
                # limit gets the next call refused (RST_STREAM: UNAVAILABLE) instead of
                # waiting: off, calls past the limit wait, as Limits.max_streams promises.
                # Memory stays bounded by limits.max_inflight_bytes and the queues.
                ("grpc.http.overload_protection", 0),
                # A second server on a taken port fails to start instead of sharing it
                # (gRPC sets SO_REUSEPORT by default: a stale process would take calls).
                ("grpc.so_reuseport", 0),
                *_connection_age(self.config.server.max_connection_age_seconds),
                *_keepalive(
                    self.config.server.keepalive_seconds,
                    self.config.server.keepalive_timeout_seconds,
                ),
            ],
        )
        servicer = CurationServicer(
            self.lifecycle,
            self.config.limits,
            self.config.align_off_reason,
            self._scorer,
            self.server_info,
            self._aligner,
            self._curator,
        )
        pb_grpc.add_CurationServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable(server, [SERVICE_NAME, health.SERVICE_NAME])
        section = self.config.server
        address = f"{section.host}:{section.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await self._set_health(_NOT_SERVING)
        await server.start()
        self._server = server
        if section.health_port >= 0:
            self._health_server, self.health_port = await serve_health_only(
                self._health, f"{section.health_host or section.host}:{section.health_port}"
            )
        if section.metrics_port >= 0:
            # Where the gRPC port is, unless configured apart: never wider than asked for.
            self._metrics = metrics.MetricsServer(
                section.metrics_host or section.host, section.metrics_port
            )
            self.metrics_port = self._metrics.address[1]

    def _scoring_model_names(self) -> list[str]:
        score = self.config.score
        return sorted({score.question_model, score.answer_model}) if score.enabled else []

    async def _load_models(self) -> None:
        models, names = self.config.models, self._scoring_model_names()
        sharing = {n: models[n] for n in names if models[n].share_base}
        # One base in memory for the models that share it; each keeps its own batcher.
        shared = (
            await asyncio.to_thread(backends.load_shared_scoring, sharing, self.config.cache_path)
            if sharing
            else {}
        )
        loaded: dict[tuple[object, ...], ScoringRuntime] = {}
        for name in names:
            model = models[name]
            if name in shared:
                runtime = self._start_runtime(shared[name])
            else:
                path = await asyncio.to_thread(self._reward_folder, name, model)
                key = (path.resolve(), *dataclasses.astuple(dataclasses.replace(model, path="")))
                if key not in loaded:  # two names for the same folder and settings: load once
                    log.info("loading model %s from %s (%s)", name, path, model.backend)
                    backend = await asyncio.to_thread(
                        backends.load_scoring, name, model, path, self.registry.scoring
                    )
                    loaded[key] = self._start_runtime(backend)
                runtime = loaded[key]
            self._runtimes[name] = runtime
            self._record_model(name, runtime.description, model)
        if self._aligner is not None:
            await self._load_llm(self.config.align.model)

    def _start_runtime(self, backend: ScoringBackend) -> ScoringRuntime:
        limits, score = self.config.limits, self.config.score
        backend.description = with_settings(  # what else changes a score (ModelRef.settings)
            backend.description,
            image_exif_transpose=score.image_exif_transpose,
            truncation=limits.truncation,
            max_text_tokens=limits.max_text_tokens,
        )
        runtime = ScoringRuntime(backend, self.config.batching, self._on_fatal)
        runtime.start()
        return runtime

    def _reward_folder(self, name: str, model: ModelConfig) -> pathlib.Path:
        """The folder a reward model loads from: its path, or with an adapter, the cached
        conversion of base + adapter (converted first if missing)."""
        path = embedded.resolve(model.path, self.config.cache_path)
        if not model.adapter:
            return path
        from align2.server.models.convert_reward import ConversionError, ensure_converted

        cache = self.config.cache_path
        tower = embedded.resolve(model.vision_tower, cache) if model.vision_tower else None
        try:
            return ensure_converted(path, embedded.resolve(model.adapter, cache), tower, cache)
        except ConversionError as exc:
            raise ConfigError(f"models.{name}.adapter: {exc}") from exc

    def _check_align(self) -> None:
        """Before binding: the inner LLM's backend and the default template set exist."""
        if self._templates is None:
            log.warning("Align is off: %s", self.config.align_off_reason)
            return
        align = self.config.align
        backends.check_backend(
            align.model, self.config.models[align.model], self.registry.generation
        )
        if align.template not in self._templates.names:
            raise ConfigError(
                f"align.template: unknown template set {align.template!r}; available: "
                f"{', '.join(self._templates.names)}"
            )

    async def _load_llm(self, name: str) -> None:
        model = self.config.models[name]
        path = await asyncio.to_thread(embedded.resolve, model.path, self.config.cache_path)
        log.info("loading inner LLM %s from %s (%s)", name, path, model.backend)
        backend = await asyncio.to_thread(
            backends.load_generation, name, model, path, self.registry.generation
        )
        backend.description = with_settings(backend.description)
        align = self.config.align
        batching = dataclasses.replace(self.config.batching, max_delay_ms=align.max_delay_ms)
        runtime = GenerationRuntime(backend, batching, align.max_inflight_items, self._on_fatal)
        runtime.start()
        self._llms[name] = runtime
        self._record_model(name, backend.description, model)

    def _record_model(self, name: str, description: ModelDescription, model: ModelConfig) -> None:
        metrics.MODEL_INFO.labels(
            model=name,
            model_id=description.model_id,
            revision=description.revision,
            backend=model.backend,
            role=self._role(name),
        ).set(1)

    def _role(self, name: str) -> str:
        score = self.config.score
        pairs = [("question_reward", score.question_model), ("answer_reward", score.answer_model)]
        if self._aligner is not None:
            pairs.append(("inner_llm", self.config.align.model))
        return "+".join(role for role, n in pairs if n == name)

    async def _warm_up(self) -> None:
        """Score a synthetic sample with both heads, and align it (rewrite both parts, then
        review when the rewrites pass the guards), through the full paths; raise on error."""
        image = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 130, 140)).save(image, format="PNG")
        sample = Sample(
            id="warm-up",
            image=image.getvalue(),
            turns=[Turn("What is shown in the image?", "A plain grey rectangle.")],
        )
        errors = []
        if self._scorer is not None:
            scored = await self._scorer.score(ScoreCall(samples=[sample]))
            errors.append(scored.results[0].error)
        if self._aligner is not None:
            # Enough for a short rewrite, so that the review runs too.
            short = DecodingOptions(max_new_tokens=min(16, self.config.align.max_new_tokens_limit))
            aligned = await self._aligner.align(AlignCall(samples=[sample], decoding=short))
            errors.append(aligned.results[0].error)
        for error in errors:
            if error is not None:
                raise RuntimeError(f"warm-up failed: {error.message}")

    # -- run -----------------------------------------------------------------------------
    def server_info(self) -> pb.GetServerInfoResponse:
        models = [
            (dataclasses.replace(rt.description, name=name), self._role(name))
            for name, rt in sorted(self._runtimes.items())
        ]
        models += [
            (dataclasses.replace(rt.description, name=name), self._role(name))
            for name, rt in sorted(self._llms.items())
        ]
        enabled = (("Score", self._scorer), ("Align", self._aligner), ("Curate", self._curator))
        services = [service for service, core in enabled if core is not None]
        templates = [(t.name, t.sha256) for t in self._templates or ()]
        return convert.server_info_to_proto(self.config, models, services, version(), templates)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where /metrics is bound (address, port), or None when it is off."""
        return None if self._metrics is None else self._metrics.address

    def scoring_backend(self, name: str) -> ScoringBackend:
        """The loaded backend for a model name (for in-process tools and benchmarks)."""
        return self._runtimes[name].backend

    def generation_backend(self, name: str) -> GenerationBackend:
        """The loaded inner LLM for a model name (for in-process tools and benchmarks)."""
        return self._llms[name].backend

    def _on_fatal(self, exc: BaseException) -> None:
        log.critical("unrecoverable backend error, marking NOT_SERVING: %s", exc)
        self.lifecycle.phase = Phase.FAILED
        asyncio.get_running_loop().create_task(self._set_health(_NOT_SERVING))

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- stop ----------------------------------------------------------------------------
    async def stop(self, grace: float | None = None) -> None:
        """Drain within ``grace`` seconds, a hard bound (see docs/operating.md, Shutdown).

        Health turns NOT_SERVING and keeps answering (the port stays open, so probes see
        NOT_SERVING rather than a refused connection); new calls get UNAVAILABLE; in-flight
        calls may finish until the deadline. There, every call still running is ended with
        UNAVAILABLE naming the grace period, the port closes, and the models stop: a batch
        still on the device stops within one layer (transformers) instead of running on."""
        grace = self.config.server.grace_seconds if grace is None else grace
        if self.lifecycle.phase is not Phase.FAILED:
            self.lifecycle.phase = Phase.DRAINING
        await self._health.enter_graceful_shutdown()
        calls = self._status.calls
        if not await calls.wait_idle(grace):
            ended = calls.end_all(
                f"server is shutting down: the call did not finish within the grace period "
                f"(server.grace_seconds {grace:g}); retry on another replica"
            )
            log.warning("grace period over: ending %d calls still running", ended)
            await calls.wait_idle(_ANSWER_SECONDS)  # each sends its UNAVAILABLE
        if self._server is not None:
            await self._server.stop(None)  # whatever is left (health watches): cancelled
        if self._health_server is not None:  # NOT_SERVING until the main port closed
            await self._health_server.stop(None)
        for runtime in {id(rt): rt for rt in self._runtimes.values()}.values():
            await runtime.close()
        for llm in self._llms.values():
            await llm.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._trimmer.close()
        if self._metrics is not None:
            self._metrics.close()
        if self.lifecycle.phase is not Phase.FAILED:
            self.lifecycle.phase = Phase.STOPPED


def _connection_age(seconds: float) -> list[tuple[str, int]]:
    """gRPC server options closing a connection after ``seconds`` (0: never) without
    cutting what runs on it (server.max_connection_age_seconds)."""
    if seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", _milliseconds(seconds)),
        ("grpc.max_connection_age_grace_ms", GRPC_MAX_MS),
    ]


def _keepalive(seconds: float, timeout: float) -> list[tuple[str, int]]:
    """gRPC server options pinging each connection after ``seconds`` without traffic and
    closing it when a ping goes unanswered for ``timeout`` (server.keepalive_seconds): the
    calls of a client gone without a FIN or RST end, instead of after gRPC's default of 2
    hours. Pings go out on a connection whose calls send nothing (a Curate stream between
    bursts): gRPC otherwise allows 2 pings without data, then none."""
    if seconds <= 0:
        return []
    return [
        ("grpc.keepalive_time_ms", _milliseconds(seconds)),
        ("grpc.keepalive_timeout_ms", _milliseconds(timeout)),
        ("grpc.http2.ping_timeout_ms", _milliseconds(timeout)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _milliseconds(seconds: float) -> int:
    """A positive duration as gRPC's integer milliseconds (at least 1)."""
    return max(1, round(seconds * 1000))
