"""Typed server configuration, read once in main() and passed down.

A TOML file (``align2 serve --config FILE``) fills these dataclasses; command-line flags
override the file. Unknown keys and wrong types are errors that name the key.
Every field has a default, so an empty file (or none) serves the embedded default models.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import dacite

from align2.server.errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

Dtype = Literal["float32", "bfloat16", "float16"]
ImageMode = Literal["pad", "square"]
Truncation = Literal["reject", "truncate"]
T = TypeVar("T")


@dataclass
class VllmConfig:
    """vLLM engine settings. Memory is always explicit: vLLM's defaults take most of a device."""

    kv_cache_memory_bytes: int = 1 * GiB
    """KV-cache size per engine. Replaces vLLM's gpu_memory_utilization heuristic."""
    max_num_seqs: int = 64
    """Most sequences the engine runs at once."""
    max_num_batched_tokens: int = 16384
    """Most tokens the engine puts in one step."""
    tensor_parallel_size: int = 1
    """GPUs one model is split over (a model larger than one card)."""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile: faster start, slower steps."""


@dataclass
class ModelConfig:
    """One model the server loads."""

    path: str
    """A model folder, or ``embedded:NAME`` for a model built offline at set-up."""
    backend: str = "transformers"
    """transformers | vllm."""
    dtype: Dtype = "float32"
    """Weights and compute dtype."""
    device: str = "auto"
    """auto (cuda when present, else cpu) | cpu | cuda | cuda:N."""
    image_mode: ImageMode = "pad"
    """pad: pad to a square with the processor's mean colour, then resize (how the method's
    reward models were trained). square: the processor's own resize/crop."""
    max_length: int = 2048
    """Most tokens (text and image) per input; the method trains with 2048."""
    revision: str = ""
    """Reported revision; empty: a content hash of the folder's files."""
    adapter: str = ""
    """A PEFT LoRA reward adapter in the original LLaVA code's format (the paper's released
    reward models); ``path`` is then its original-LLaVA base (llava-v1.5-7b). At start the
    pair is converted once, as ``align2 convert-reward`` does, into ``server.cache_dir``
    (keyed by the sha256 of every input file) and served from there; with ``share_base``
    it is applied unmerged to a base shared with the other head instead. Reward models
    only."""
    vision_tower: str = ""
    """With ``adapter``: the CLIP folder the base's ``mm_vision_tower`` names (e.g.
    clip-vit-large-patch14-336); empty: that name itself, when it is a folder here."""
    share_base: bool = False
    """With ``adapter``: keep ONE copy of the base ``path`` in memory for all models that set
    share_base with the same ``path`` and ``vision_tower`` (the paper's question and answer
    heads), and apply this model's LoRA adapter, projector and score head to it per batch,
    unmerged; the vision tower's output for an image is computed once for every head. Memory:
    one base plus the adapters instead of one merged copy each; nothing is converted or
    written to the cache. Those models must agree on ``dtype`` and ``device``; transformers
    backend only. false: the adapter is merged into its own copy (see ``adapter``)."""
    continuous_rows: int = 0
    """Inner LLM on transformers: 0 batches generations with the core's batcher (a batch
    decodes to its end; requests arriving meanwhile wait for the next batch); N > 0 batches
    continuously: a request joins the running batch at the next decoding step and a
    finished one leaves at once, at most N decoding together (the rest wait in order).
    Needs a full-attention model (Llama, SmolLM2, ...). vLLM always batches continuously."""
    share_prefixes: bool = True
    """Reward models on transformers: inputs of one batch that carry the same image and
    begin with the same ids (the turns of a conversation, the candidates of a turn under
    the answer head) run that prefix, image included, once, and only their remainders
    after it; scores equal running each input whole within float rounding (1e-5 relative
    in the tests). false: every input runs whole."""
    length_split_tokens: int = -1
    """Reward models on transformers: a batch whose inputs differ in length runs as several
    forwards of neighbouring lengths when each extra forward saves more than this many
    padded tokens (backends/length_groups.py); scores stay the same within float rounding.
    -1: by device, 64 on a CPU (measured, bench/length_split.py: 1.03-1.12x) and 512 on a
    GPU, where one more forward costs more (launches, reading the weights again; 512 is an
    estimate, not measured). 0: one forward per batch."""
    vllm: VllmConfig = field(default_factory=VllmConfig)

    @property
    def base_key(self) -> tuple[str, str]:
        """What the models that share one base (``share_base``) have in common."""
        return (os.path.expanduser(self.path), os.path.expanduser(self.vision_tower))


@dataclass
class LimitsConfig:
    """Input limits; each is reported by GetServerInfo and named in the error it causes."""

    max_samples_per_call: int = 64
    """Samples in one Score or Align call; more: the call fails with INVALID_ARGUMENT."""
    max_message_bytes: int = 64 * MiB
    """Largest gRPC request message. Responses are not bound by it: an Align response holds
    each text twice (original and rewrite) and can be about twice its request."""
    max_image_bytes: int = 16 * MiB
    """Encoded size of one image."""
    max_image_pixels: int = 40_000_000
    """Width x height, read from the image header before decoding (no decompression bombs);
    for a model that pads images to a square (image_mode pad), the padded square's pixels,
    i.e. the longer side squared: what is actually allocated. At most 178,956,970 (Pillow
    refuses larger images itself)."""
    max_turns: int = 64
    """Question/answer turns in one sample."""
    max_candidates: int = 16
    """Candidate answers of one turn (best-of-n, Turn.answer_candidates); each is one forward
    pass of the answer head."""
    max_inflight_bytes: int = 256 * MiB
    """Request bytes (wire size) of the Score and Align calls admitted and not finished,
    and of the samples Curate streams hold (image and texts, read and not yet decided); a
    call that does not fit is refused at once with RESOURCE_EXHAUSTED before it is
    converted or queued, and its bytes are given back when it ends; a stream's sample that
    does not fit waits (its stream reads no further: flow control). Bounds the memory that
    requests hold, which max_queue_items (forward passes) does not. 0: unbounded; else at
    least max_message_bytes, so that a lone call always fits."""
    max_decoded_image_bytes: int = 1 * GiB
    """Memory of the images being decoded and scored at once, server-wide, estimated from
    each header before decoding: width x height x 8 (Pillow holds RGB at 4 bytes a pixel: the
    decode and its RGB copy; x 20 for WebP, whose decoder holds buffers of its own), plus
    the padded square x 4 for a model with image_mode pad (a square image is not padded).
    An image that does not fit waits (first come, first served, within its call's deadline;
    then DEADLINE_EXCEEDED for its sample); one larger than the limit is decoded when no
    other is held. Each is held from its decode until its sample's forward passes on one
    head are done. Request bytes (max_inflight_bytes) count images encoded: a 131 KB PNG
    can decode to 159 MB. 0: unbounded."""
    max_streams: int = 100
    """Concurrent RPCs (HTTP/2 streams) per client connection; more wait in gRPC until one
    ends (gRPC's max_concurrent_streams)."""
    max_stream_inflight: int = 64
    """Samples of one Curate stream held at once, from being read until their decision is
    sent; the server reads the next sample only when a slot frees, so a fast producer is
    slowed by gRPC flow control (nothing is refused or dropped). 0 disables Curate."""
    max_text_tokens: int = 2048
    """Text tokens of one reward input (the model's max_length also applies)."""
    max_text_bytes: int = 64 * KiB
    """UTF-8 bytes of one question, answer or candidate, and of one sample's questions
    together (the question head's one text); more: INVALID_ARGUMENT for the sample, checked
    before anything is tokenised (a tokeniser holds hundreds of bytes per token), in both
    truncation modes. The default, 64 KiB, is 32 bytes per token of the default
    max_text_tokens (real text averages about 4): raise both together."""
    truncation: Truncation = "reject"
    """reject: a too-long item fails with INVALID_ARGUMENT. truncate: the text is cut to fit
    and the result says so (question_truncated / answer_truncated)."""


@dataclass
class BatchingConfig:
    """The dynamic batcher in front of each transformers model."""

    max_batch_size: int = 32
    """Most items in one forward pass."""
    max_batch_tokens: int = 32768
    """Budget per batch in padded tokens: batch size x longest item (text + image)."""
    max_delay_ms: float = 2.0
    """Longest a batch waits for batch-mates that are admitted and still being prepared
    (decoded, tokenised). Nothing else on its way: it runs at once, so an idle server never
    waits; under load, batches fill while the device is busy."""
    max_queue_items: int = 1024
    """Items (one forward pass each) admitted and not yet finished; beyond: RESOURCE_EXHAUSTED."""
    preprocess_workers: int = 0
    """Threads decoding images and tokenising, off the event loop. 0: half the CPUs this
    process may use, 2 to 8 (docs/operating.md, "Threads")."""


@dataclass
class ScoreConfig:
    """The Score RPC: which configured models are the question and answer reward models."""

    enabled: bool = True
    """Serve Score (false: Score and Curate answer UNIMPLEMENTED and no reward model is
    loaded)."""
    question_model: str = "question"
    """Name (in [models]) of the default question reward model."""
    answer_model: str = "answer"
    """Name (in [models]) of the default answer reward model."""
    image_exif_transpose: bool = False
    """Turn each image as its EXIF orientation says before scoring. Off: the stored pixel
    order, as the method's reference code reads images (docs/scoring.md)."""


@dataclass
class DecodingConfig:
    """Default decoding of the inner LLM's rewrites; an Align call may override each field."""

    max_new_tokens: int = 256
    """Most tokens one rewrite may generate; a rewrite cut there is rejected (guard
    ``truncated``)."""
    temperature: float = 0.0
    """0: greedy (deterministic). Else sampling, seeded by ``seed``, at a temperature in
    [0.01, 2] (why: docs/operating.md, "Request limits")."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]."""
    seed: int = 0
    """Seed of sampling, 0..2**64-1: the same seed and inputs give the same rewrite."""


@dataclass
class AlignConfig:
    """The Align RPC: the inner LLM rewrites each turn, then reviews original vs rewrite."""

    enabled: bool | None = None
    """true | false; unset: on when [models] has ``model`` (the defaults do), so a config
    whose [models] lists only reward models serves Score alone."""
    model: str = "llm"
    """Name (in [models]) of the inner LLM."""
    template: str = "default-v1"
    """Default prompt template set: a folder of align2/server/templates/align/."""
    review: bool = True
    """Review each rewrite against its original by default (calls may switch it off)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    max_new_tokens_limit: int = 1024
    """Largest max_new_tokens a call may ask for."""
    max_delay_ms: float = 50.0
    """Longest a transformers generation batch waits for rewrites that are admitted and
    still being prepared (rendered, tokenised). A batch generates for seconds and cannot
    take latecomers, so starting one full batch beats starting a small one first; like
    batching.max_delay_ms it never delays a lone request on an idle server."""
    max_inflight_items: int = 4096
    """LLM requests (one rewrite or one review choice each) admitted and not finished;
    beyond: RESOURCE_EXHAUSTED. A call claims up to 4 per turn at once (2 rewrites, 2
    review choices), so one full call of 64 ten-turn samples fits. Also bounds the batcher
    queue of a transformers LLM."""


@dataclass
class CurateConfig:
    """The Curate stream: score, select the top fractions per task type, align the kept.

    A sample is kept when its score is among the top fraction of the last ``window``
    scores of its task type, itself included (see align2/server/core/selection.py): the
    scores of its own stream, or of every stream naming the same selection key on this
    server (never across replicas); or against thresholds the stream gives (calibration).
    See align2/server/core/selector.py for the warm-up."""

    question_keep_fraction: float = 0.3
    """Default share kept by question score, per task type (the method's 30%)."""
    answer_keep_fraction: float = 0.3
    """Default share of the question-kept kept by mean answer score (the method's 30%)."""
    window: int = 10000
    """Recent scores per task type and stage that a threshold is computed from."""
    min_window: int = 100
    """Default warm-up: a decision waits until its task's window holds this many scores
    (seeds included), or until every in-flight slot of its stream holds a waiting sample,
    or its stream's input has ended and all its remaining samples wait; then it is made
    against the window as it is. 1: decide at once (the first sample of a task is kept).
    At most ``window``."""
    warm_up_idle_ms: int = 500
    """A stream whose producer has sent nothing for this long, while every sample it has
    in flight waits for a warm-up, has those decided at once against the window as it is:
    a producer that waits for each decision before sending the next never deadlocks. 0:
    never (only the in-flight bound or the end of input release them)."""
    max_selection_keys: int = 64
    """Selection keys live at once (in use, or idle within ``selection_key_idle_seconds``);
    a stream naming a new one beyond: RESOURCE_EXHAUSTED. 0: no stream may name a key
    (INVALID_ARGUMENT)."""
    selection_key_idle_seconds: float = 600.0
    """How long a selection key's windows outlive the last stream that used it."""
    max_seed_scores: int = 100_000
    """Most calibration scores one stream's options may seed its windows with (both
    stages, all task types together); more: INVALID_ARGUMENT."""
    max_task_types: int = 256
    """Task types one selection (a stream's own, or a selection key's) keeps windows for,
    per stage: a sample of a new task type beyond gets INVALID_ARGUMENT (decision ERROR),
    seeds for more: INVALID_ARGUMENT for the stream. The task is any string the caller
    sends, and each costs a window (up to ``window`` scores), so this bounds the memory
    of a selection. Given thresholds need no window and do not count."""
    max_stored_scores: int = 32_000_000
    """Scores all selection windows of this server hold together (every stream's own and
    every selection key's; 16 bytes each: 512 MB at the default). Full: a stream whose seeds
    would add scores is refused, and a sample that would add a score to a window not yet
    full gets RESOURCE_EXHAUSTED (decision ERROR), until streams end and idle keys expire.
    0: no bound (then ``max_selection_keys`` x ``max_task_types`` x 2 x ``window`` for the
    keys, plus as much again for each stream's own windows)."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
GRPC_MAX_MS = 2**31 - 1
"""gRPC takes milliseconds as a 32-bit int; this is also its "infinite"."""
MAX_CONNECTION_AGE_SECONDS = GRPC_MAX_MS // 1000
MAX_IMAGE_PIXELS = 178_956_970
"""Pillow's own refusal (2 x PIL.Image.MAX_IMAGE_PIXELS): a larger header never opens,
whatever limits.max_image_pixels says, so that limit may not be set above it."""


@dataclass
class ServerSection:
    """Ports, shutdown, logging and the model cache."""

    host: str = "[::]"
    """Address the gRPC port binds ([::] = every interface)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (logged at start)."""
    metrics_port: int = 9090
    """Prometheus /metrics port; 0 picks a free one, -1 disables it."""
    metrics_host: str = ""
    """Address the metrics port binds; empty: the same as ``host``. It has neither TLS nor
    tokens (docs/operating.md, "Metrics"): keep it where only the scraper reaches it."""
    health_port: int = -1
    """A second gRPC port that serves only health (grpc.health.v1), in plaintext and without
    tokens even when ``[security]`` sets TLS or tokens, for the kubelet's ``grpc`` probes and
    Docker's HEALTHCHECK, which speak plaintext; 0 picks a free one, -1 (default): none. It
    tells serving status, nothing else; it answers NOT_SERVING through a drain like the
    main port, and closes with it."""
    health_host: str = ""
    """Address the health port binds; empty: the same as ``host``."""
    grace_seconds: float = 30.0
    """On SIGTERM: how long in-flight calls may run, a hard bound: at the deadline the calls
    left are answered UNAVAILABLE and the batch on the device stops (docs/operating.md,
    Shutdown). Health answers NOT_SERVING meanwhile."""
    max_connection_age_seconds: float = 300.0
    """After about this long (gRPC adds +-10% jitter) a client connection is asked to close
    (HTTP/2 GOAWAY): the client connects again and resolves the name again, so replicas
    added since (a scale-up) get their share of a long-lived client's calls. Calls and
    Curate streams in flight on it are never cut (their grace is unlimited); new calls go
    to the new connection. 0: connections live as long as the client keeps them. At most
    2147483 (gRPC takes milliseconds as a 32-bit int)."""
    keepalive_seconds: float = 60.0
    """The server pings each client connection after this long without traffic from it
    (HTTP/2 PING, gRPC keepalive), also while a call on it is idle (a Curate stream between
    bursts), and closes a connection whose ping is not answered within
    ``keepalive_timeout_seconds``: the calls of a client that vanished without closing its
    connection (a host or pod gone, a partition, a NAT dropping the flow) then end, and
    what they hold is freed (a Curate stream's selection key and window scores, its HTTP/2
    stream). gRPC's own default is 2 hours. 0: no pings. At most 2147483."""
    keepalive_timeout_seconds: float = 20.0
    """How long a keepalive ping may go unanswered before the connection is closed."""
    cache_dir: str = "~/.cache/align2"
    """Where embedded models are built and cached."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    log_format: Literal["json", "text"] = "json"
    """json: one JSON object per line with a request_id (for log shippers); text: plain."""
    log_payloads: bool = False
    """Log sample text at DEBUG level. Off: sample text and images are never logged."""
    trim_idle_seconds: float = 1.0
    """After a burst (the admitted request bytes drained, at least 64 MiB of them since the
    last time) and this many seconds without a new call, hand freed heap memory back to the
    operating system (glibc malloc_trim): glibc otherwise keeps it, and the process stays
    at its peak size (docs/operating.md, "Memory"). -1: never."""
    torch_threads: int = 0
    """Intra-op threads for torch. 0: the CPUs this process may use (its affinity, capped by
    a cgroup CPU quota). Unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set, `align2 serve`
    sets GOMP_SPINCOUNT=30000, so that idle torch threads spin briefly, then sleep, instead
    of spinning on CPUs that preparation needs."""


@dataclass
class SecurityConfig:
    """TLS, mutual TLS and bearer tokens for the gRPC port. Off by default (plaintext)."""

    tls_cert_file: str = ""
    """PEM certificate chain of the server; with tls_key_file, serves TLS."""
    tls_key_file: str = ""
    """PEM private key of the server certificate."""
    tls_client_ca_file: str = ""
    """PEM roots that client certificates must chain to; set: mutual TLS is required."""
    auth_tokens_file: str = ""
    """File with the accepted bearer tokens, one per line; set: every call needs
    ``authorization: Bearer <token>`` (compared in constant time)."""
    open_health: bool = True
    """Health checks need no token, so that orchestrator probes work."""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file or self.tls_key_file)


def _embedded_reward(head: str) -> ModelConfig:
    """The embedded default reward model of ``head``: its LoRA adapter over the shared
    embedded base, as the paper's released adapters are served (README)."""
    return ModelConfig(
        path="embedded:reward-base",
        adapter=f"embedded:reward-{head}-lora",
        vision_tower="embedded:reward-vision",
        share_base=True,
    )


def _default_models() -> dict[str, ModelConfig]:
    return {
        "question": _embedded_reward("question"),
        "answer": _embedded_reward("answer"),
        "llm": ModelConfig(path="embedded:smollm2-135m-instruct"),
    }


@dataclass
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    models: dict[str, ModelConfig] = field(default_factory=_default_models)

    @property
    def cache_path(self) -> pathlib.Path:
        return pathlib.Path(self.server.cache_dir).expanduser()

    @property
    def align_enabled(self) -> bool:
        """``align.enabled``, or when unset: whether [models] has ``align.model``."""
        if self.align.enabled is None:
            return self.align.model in self.models
        return self.align.enabled

    @property
    def align_off_reason(self) -> str:
        """Why Align is off ("" when on), for the refusals and the start-up log: a config
        whose own [models] table leaves out the LLM turns it off silently otherwise."""
        if self.align_enabled:
            return ""
        if self.align.enabled is False:
            return "align.enabled = false"
        return (
            f"[models] has no {self.align.model!r} (align.model); a [models] table replaces "
            "the default models"
        )

    def validate(self) -> Config:
        """Cross-field checks; raises ConfigError naming the key."""
        if self.score.enabled:
            for key in ("question_model", "answer_model"):
                name = getattr(self.score, key)
                if name not in self.models:
                    raise ConfigError(
                        f"score.{key}: unknown model {name!r}; [models] has "
                        f"{', '.join(sorted(self.models)) or 'none'}"
                    )
        self._validate_align()
        self._validate_adapters()
        positive = {
            "limits.max_samples_per_call": self.limits.max_samples_per_call,
            "limits.max_candidates": self.limits.max_candidates,
            "limits.max_text_bytes": self.limits.max_text_bytes,
            "batching.max_batch_size": self.batching.max_batch_size,
            "batching.max_queue_items": self.batching.max_queue_items,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")
        counts = {
            "batching.preprocess_workers": self.batching.preprocess_workers,
            "server.torch_threads": self.server.torch_threads,
        }
        for key, value in counts.items():
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0 (0: sized from the machine), got {value}")
        if self.server.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(
                f"server.log_level: {self.server.log_level!r}; valid: {', '.join(LOG_LEVELS)}"
            )
        seconds = {
            "server.grace_seconds": self.server.grace_seconds,
            "server.max_connection_age_seconds": self.server.max_connection_age_seconds,
            "server.keepalive_seconds": self.server.keepalive_seconds,
            "server.keepalive_timeout_seconds": self.server.keepalive_timeout_seconds,
        }
        for key, time in seconds.items():
            if not time >= 0:  # NaN too
                raise ConfigError(f"{key}: must be >= 0, got {time}")
        for key in ("max_connection_age_seconds", "keepalive_seconds", "keepalive_timeout_seconds"):
            if not getattr(self.server, key) <= MAX_CONNECTION_AGE_SECONDS:  # gRPC options
                raise ConfigError(
                    f"server.{key}: at most {MAX_CONNECTION_AGE_SECONDS} (gRPC's limit: "
                    "milliseconds as a 32-bit int, about 24.8 days), "
                    f"got {getattr(self.server, key)}"
                )
        if self.server.keepalive_seconds > 0 and not self.server.keepalive_timeout_seconds > 0:
            raise ConfigError(
                "server.keepalive_timeout_seconds: must be > 0 when keepalive_seconds is set, "
                f"got {self.server.keepalive_timeout_seconds}"
            )
        server = self.server
        if not -1 <= server.health_port <= 65535:
            raise ConfigError(
                f"server.health_port: -1 (none), 0 (a free one) or a port, got {server.health_port}"
            )
        if server.health_port > 0 and server.health_port in (server.port, server.metrics_port):
            raise ConfigError(
                f"server.health_port: {server.health_port} is already the gRPC or metrics port"
            )
        self._validate_curate()
        limits = self.limits
        if not 0 < limits.max_image_pixels <= MAX_IMAGE_PIXELS:
            raise ConfigError(
                f"limits.max_image_pixels: 1 to {MAX_IMAGE_PIXELS} (Pillow refuses larger "
                f"images itself), got {limits.max_image_pixels}"
            )
        if limits.max_decoded_image_bytes < 0:
            raise ConfigError(
                "limits.max_decoded_image_bytes: must be >= 0, got "
                f"{limits.max_decoded_image_bytes}"
            )
        if limits.max_inflight_bytes < 0:
            raise ConfigError(
                f"limits.max_inflight_bytes: must be >= 0, got {limits.max_inflight_bytes}"
            )
        if 0 < limits.max_inflight_bytes < limits.max_message_bytes:
            raise ConfigError(
                f"limits.max_inflight_bytes: {limits.max_inflight_bytes} is less than "
                f"limits.max_message_bytes {limits.max_message_bytes} (a lone call of the "
                f"largest accepted size must fit); 0 turns the bound off"
            )
        security = self.security
        if bool(security.tls_cert_file) != bool(security.tls_key_file):
            raise ConfigError("security.tls_cert_file and security.tls_key_file go together")
        if security.tls_client_ca_file and not security.tls:
            raise ConfigError("security.tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    def _validate_adapters(self) -> None:
        scoring = (
            {self.score.question_model, self.score.answer_model} if self.score.enabled else set()
        )
        for name, model in self.models.items():
            if model.vision_tower and not model.adapter:
                raise ConfigError(f"models.{name}.vision_tower: only used with an adapter")
            if model.length_split_tokens < -1:
                raise ConfigError(
                    f"models.{name}.length_split_tokens: must be >= -1 (-1: by device, 0: "
                    f"one forward per batch), got {model.length_split_tokens}"
                )
            if model.continuous_rows < 0:
                raise ConfigError(
                    f"models.{name}.continuous_rows: must be >= 0 (0: batched by the "
                    f"core's batcher), got {model.continuous_rows}"
                )
            # A reward model may sit unused (Score off); the inner LLM cannot be an adapter.
            if model.adapter and name == self.align.model and name not in scoring:
                raise ConfigError(
                    f"models.{name}.adapter: adapters are reward models (the paper's LoRA "
                    f"reward adapters); {name!r} is align.model, the inner LLM"
                )
        self._validate_shared_bases()

    def _validate_shared_bases(self) -> None:
        sharing: dict[tuple[str, str], str] = {}  # base -> the first model that shares it
        for name, model in self.models.items():
            if not model.share_base:
                continue
            if not model.adapter:
                raise ConfigError(
                    f"models.{name}.share_base: needs an adapter (a base is shared by the "
                    "LoRA reward adapters served over it)"
                )
            if model.backend != "transformers":
                raise ConfigError(
                    f"models.{name}.share_base: the transformers backend only, got "
                    f"{model.backend!r} (vLLM's LoRA cannot swap each head's projector)"
                )
            first = sharing.setdefault(model.base_key, name)
            for key in ("dtype", "device"):
                mine, theirs = getattr(model, key), getattr(self.models[first], key)
                if mine != theirs:
                    raise ConfigError(
                        f"models.{name}.{key}: {mine!r} differs from models.{first}.{key} "
                        f"{theirs!r}, whose base it shares (share_base)"
                    )

    def _validate_curate(self) -> None:
        curate = self.curate
        for key in ("question_keep_fraction", "answer_keep_fraction"):
            value = getattr(curate, key)
            if not 0 < value <= 1:
                raise ConfigError(f"curate.{key}: must be in (0, 1], got {value}")
        if curate.window < 1:
            raise ConfigError(f"curate.window: must be at least 1, got {curate.window}")
        if not 1 <= curate.min_window <= curate.window:
            raise ConfigError(
                f"curate.min_window: must be in 1..curate.window ({curate.window}), "
                f"got {curate.min_window}"
            )
        counts = ("max_selection_keys", "max_seed_scores", "warm_up_idle_ms", "max_stored_scores")
        for key in counts:
            if getattr(curate, key) < 0:
                raise ConfigError(f"curate.{key}: must be >= 0, got {getattr(curate, key)}")
        if curate.max_task_types < 1:
            raise ConfigError(
                f"curate.max_task_types: must be at least 1, got {curate.max_task_types}"
            )
        if not curate.selection_key_idle_seconds >= 0:
            raise ConfigError(
                "curate.selection_key_idle_seconds: must be >= 0, got "
                f"{curate.selection_key_idle_seconds}"
            )
        if self.limits.max_stream_inflight < 0:
            raise ConfigError(
                f"limits.max_stream_inflight: must be >= 0, got {self.limits.max_stream_inflight}"
            )

    @property
    def curate_enabled(self) -> bool:
        """Curate needs Score (and Align for streams that ask to restyle)."""
        return self.score.enabled and self.limits.max_stream_inflight > 0

    def _validate_align(self) -> None:
        align, decoding = self.align, self.align.decoding
        if align.enabled and align.model not in self.models:
            raise ConfigError(
                f"align.model: unknown model {align.model!r}; [models] has "
                f"{', '.join(sorted(self.models)) or 'none'}"
            )
        for key, value in {
            "align.max_inflight_items": align.max_inflight_items,
            "align.max_new_tokens_limit": align.max_new_tokens_limit,
        }.items():
            if value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")
        problem = decoding_problem(decoding, align.max_new_tokens_limit)
        if problem:
            raise ConfigError(f"align.decoding.{problem}")


MIN_TEMPERATURE = 0.01
"""Lowest sampling temperature. Sampling divides the logits by the temperature before the
softmax: a denormal temperature (1e-45) makes them infinite in float32 and the draw fails
(NaN probabilities); vLLM raises anything in (0, 0.01) to 0.01 for the same reason. Below
0.01 sampling is all but greedy anyway: ask for 0."""
MAX_TEMPERATURE = 2.0
"""Highest sampling temperature: vLLM refuses more, and above it the draw approaches
uniform noise over the vocabulary (``inf`` would be exactly that)."""
MAX_SEED = 2**64 - 1
"""Largest seed: the range of the request's uint64 and of a torch generator's seed."""


def decoding_problem(
    decoding: DecodingConfig,
    max_new_tokens_limit: int,
    limit_name: str = "align.max_new_tokens_limit",
) -> str | None:
    """What is wrong with ``decoding`` (``field: why``), or None. Shared by the config check
    and the per-call check of Align options, which prefix the field with their own path.
    ``limit_name``: what the message calls the limit (the config key at start-up; a call's
    error names it as GetServerInfo reports it, ``limits.max_new_tokens``).

    The ranges are those where every backend's sampler is defined and agrees: temperature 0
    (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE], top_p in (0, 1], NaN refused
    everywhere (every comparison below is False for NaN), seed in 0..MAX_SEED."""
    tokens = decoding.max_new_tokens
    if tokens < 1:
        return f"max_new_tokens: {tokens} is less than 1"
    if tokens > max_new_tokens_limit:
        return f"max_new_tokens: {tokens} exceeds {limit_name} {max_new_tokens_limit}"
    temperature = decoding.temperature
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        return (
            f"temperature: {temperature} is neither 0 (greedy) nor in "
            f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
        )
    if not 0 < decoding.top_p <= 1:
        return f"top_p: {decoding.top_p} is not in (0, 1]"
    if not 0 <= decoding.seed <= MAX_SEED:
        return f"seed: {decoding.seed} is not in 0..{MAX_SEED}"
    return None


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML; unknown keys, missing values and wrong types raise
    ConfigError naming the whole key (``server.prot``, ``models.q.path``)."""
    data = dict(data)
    models = data.pop("models", None)
    config = _typed(Config, data, "")
    if models is not None:
        if not isinstance(models, dict):
            raise ConfigError(f"models: must be a table of models, got {models!r}")
        config.models = {
            name: _typed(ModelConfig, value, f"models.{name}") for name, value in models.items()
        }
    return config.validate()


def _typed(cls: type[T], data: Any, where: str) -> T:
    """``cls`` filled from ``data`` (the table at key ``where``), every error naming its key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table, got {data!r}")
    _check_keys(cls, data, where)
    try:
        return dacite.from_dict(cls, data, config=dacite.Config(strict=True))
    except dacite.DaciteFieldError as exc:
        if where:
            exc.update_path(where)
        raise ConfigError(f"{exc.field_path}: {_reason(exc)}") from None


def _reason(exc: dacite.DaciteFieldError) -> str:
    if isinstance(exc, dacite.WrongTypeError):
        kind = exc.field_type
        if typing.get_origin(kind) is Literal:
            allowed = ", ".join(map(repr, typing.get_args(kind)))
            return f"must be one of {allowed}; got {exc.value!r}"
        return f"must be {getattr(kind, '__name__', kind)}, got {exc.value!r}"
    if isinstance(exc, dacite.MissingValueError):
        return "missing (it has no default)"
    return str(exc)


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    """ConfigError for the first key of ``data`` that ``cls`` has no field for, naming the
    keys it has; nested sections are checked the same way."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(
                f"{path}: unknown key; {'[' + where + ']' if where else 'the file'} has: "
                f"{', '.join(names)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: must be a table ([{path}]), got {value!r}")
            _check_keys(hints[key], value, path)


def load(path: str | pathlib.Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (or nothing), apply dotted overrides like {"server.port": 0}."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(pathlib.Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(data)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
