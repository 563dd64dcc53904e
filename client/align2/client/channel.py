"""How the client connects: channel options, retries, load balancing, TLS and the bearer
token.

Retries are gRPC's own (a service-config ``retryPolicy``), not a loop of ours: gRPC only
replays an attempt the server has not answered, honours the call's deadline across attempts
and applies exponential backoff with jitter. Both the sync and the asyncio client hold their
arguments as one :class:`ClientOptions` and open their channel from it with
:func:`open_channel`.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import grpc

from align2.client.balancing import balancing_config, lb_policy
from align2.client.calls import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_MESSAGE_BYTES
from align2.client.health import SERVICE

# Unary RPCs only: a replayed Curate stream could be decided twice. Score and GetServerInfo
# have no side effects; Align regenerates, which is what a caller retrying would get too.
RETRIED_METHODS = ("Score", "Align", "GetServerInfo")
# Not shorter than a stock gRPC server's minimum ping interval (5 min): shorter keepalives
# during long calls earn a GOAWAY "too_many_pings" from servers with default settings.
KEEPALIVE_TIME_MS = 300_000
KEEPALIVE_TIMEOUT_MS = 20_000
# gRPC's reconnection backoff grows 1.6-fold per failed try, up to 120 s by default: the
# longer a server is down, the longer a client may wait after it is back (a curate stream
# resumed 10.3 s after a 16 s restart). At most 10 s between tries here.
MAX_RECONNECT_BACKOFF_MS = 10_000
# gRPC core can leave a call hanging when a retry timer of about a millisecond races the
# failed attempt's completion (grpc/grpc#41036, seen with grpcio 1.85): keep backoffs above it.
MIN_BACKOFF_SECONDS = 0.01

Pem = bytes | str | os.PathLike[str]
"""PEM content as bytes, or the path of a PEM file."""
ChannelOptions = Mapping[str, Any] | Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """Retry of an RPC that failed with one of ``codes`` before the server answered it.

    Backoff before attempt n (n >= 2) is about min(initial * multiplier**(n-2), max) seconds,
    jittered by gRPC; backoffs are at least :data:`MIN_BACKOFF_SECONDS`. ``max_attempts``
    counts the first attempt; gRPC caps it at 5 and never retries past the call's deadline.
    """

    max_attempts: int = 5
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    backoff_multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
    throttle_max_tokens: int = 1000
    """gRPC's retry throttling (gRFC A6), per channel: a token count starts here (at most
    1000), each attempt that fails with one of ``codes`` takes 1, each success gives back
    ``throttle_token_ratio``; while it is at or below half of this, no call is retried. So a
    server that keeps failing gets at most about 500 retries from this channel, then one
    attempt per call; a burst that a server paces (its RESOURCE_EXHAUSTED says when to come
    back) is still absorbed: measured, 200 concurrent calls against an 8-call queue all
    finished (docs/operating.md). 0: no throttling."""
    throttle_token_ratio: float = 2.0
    """Tokens a success gives back (up to 3 decimals): retries stop while, on balance, more
    than ratio / (1 + ratio) of the attempts fail (2: two thirds; a paced burst costs about
    one refused attempt per call, so 1 throttled repeated bursts)."""

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts: {self.max_attempts} is not in [2, 5]")
        if min(self.initial_backoff_seconds, self.max_backoff_seconds) < MIN_BACKOFF_SECONDS:
            raise ValueError(f"backoff seconds must be at least {MIN_BACKOFF_SECONDS}")
        if self.backoff_multiplier <= 0:
            raise ValueError(f"backoff_multiplier: {self.backoff_multiplier} is not positive")
        unknown = set(self.codes) - set(grpc.StatusCode.__members__)
        if unknown:
            raise ValueError(f"codes: unknown status codes {sorted(unknown)}")
        if not 0 <= self.throttle_max_tokens <= 1000:
            raise ValueError(f"throttle_max_tokens: {self.throttle_max_tokens} is not in [0, 1000]")
        if self.throttle_token_ratio < 0.001:
            raise ValueError(f"throttle_token_ratio: {self.throttle_token_ratio} is below 0.001")

    def service_config(self) -> str:
        """The ``grpc.service_config`` JSON applying this policy to :data:`RETRIED_METHODS`."""
        return json.dumps(self.method_config())

    def method_config(self) -> dict[str, Any]:
        """This policy's part of the service config: its ``methodConfig`` entry and, unless
        ``throttle_max_tokens`` is 0, ``retryThrottling``."""
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff_seconds),
            "maxBackoff": _duration(self.max_backoff_seconds),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.codes),
        }
        names = [{"service": SERVICE, "method": method} for method in RETRIED_METHODS]
        config: dict[str, Any] = {"methodConfig": [{"name": names, "retryPolicy": policy}]}
        if self.throttle_max_tokens:
            config["retryThrottling"] = {
                "maxTokens": self.throttle_max_tokens,
                "tokenRatio": round(self.throttle_token_ratio, 3),
            }
        return config


@dataclass(frozen=True)
class ClientOptions:
    """How a client reaches its server and sends its calls: one field per keyword argument of
    :class:`~align2.client.CurationClient` and :class:`~align2.client.AsyncCurationClient`.
    Checked when built (ValueError naming the argument); files are read when the channel is
    opened."""

    target: str
    """``host:port``, any gRPC target string (``dns:///NAME:PORT``: every address of the name;
    ``ipv4:IP:PORT,IP:PORT``: these replicas). The clients also take a list of ``IP:PORT``
    or one string of them separated by commas (:func:`.balancing.target_string`)."""
    timeout: float | None = None
    """Default deadline of each RPC in seconds (None: no deadline); a call's ``timeout``
    argument overrides it. Retries happen within the deadline."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Most samples per RPC (the server's default ``max_samples_per_call``); larger inputs are
    sent as several RPCs and their results concatenated."""
    token: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    """Sent with every call as ``authorization: Bearer <token>`` metadata."""
    root_certificates: Pem | None = None
    """PEM bytes or file path; any certificate switches the channel to TLS."""
    private_key: Pem | None = field(default=None, repr=False)
    """With ``certificate_chain``: the client's certificate, for mutual TLS."""
    certificate_chain: Pem | None = None
    tls: bool | None = None
    """True: TLS with the system roots when no certificate is given."""
    options: ChannelOptions | None = None
    """Raw gRPC channel arguments, applied over ours."""
    retry: bool | RetryPolicy = True
    """gRPC's own retry of UNAVAILABLE and RESOURCE_EXHAUSTED with exponential backoff (True:
    :class:`RetryPolicy` defaults; False: no retry)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Send and receive limit of the channel."""
    load_balancing: str | None = None
    """gRPC's load-balancing policy: "round_robin" (each call to the next ready replica of all
    the target resolves to) or "pick_first" (every call to one address). None: round_robin
    when the target names several replicas (a ``dns:`` name or an address list), else gRPC's
    default, pick_first."""
    health_check: bool = True
    """With round_robin: gRPC's client-side health checking; a replica whose
    ``align2.v1.CurationService`` is not SERVING gets no calls until it is again. It needs the
    server's health service open without a token (the server's default): gRPC's health watch
    carries no call metadata."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: {self.chunk_size} is not positive")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout: {self.timeout} is not positive")
        _wants_tls(self.root_certificates, self.private_key, self.certificate_chain, self.tls)
        lb_policy(self.target, self.load_balancing)

    @property
    def policy(self) -> str | None:
        """The load-balancing policy the channel uses (None: gRPC's default, pick_first)."""
        return lb_policy(self.target, self.load_balancing)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with every call."""
        return call_metadata(self.token)


class ClientArgs(TypedDict, total=False):
    """The clients' keyword arguments: the fields of :class:`ClientOptions` after ``target``
    (for type checkers; the dataclass holds the defaults and the checks)."""

    timeout: float | None
    chunk_size: int
    token: str | None
    root_certificates: Pem | None
    private_key: Pem | None
    certificate_chain: Pem | None
    tls: bool | None
    options: ChannelOptions | None
    retry: bool | RetryPolicy
    max_message_bytes: int
    load_balancing: str | None
    health_check: bool


def open_channel(options: ClientOptions, *, aio: bool = False) -> Any:
    """A ``grpc.Channel`` per ``options``, or with ``aio`` a ``grpc.aio.Channel`` (open that
    inside the event loop that will use it). Reads the PEM files."""
    transport = grpc.aio if aio else grpc
    arguments = channel_options(
        options.options,
        retry=options.retry,
        max_message_bytes=options.max_message_bytes,
        load_balancing=options.policy,
        health_check=options.health_check,
    )
    credentials = channel_credentials(
        options.root_certificates, options.private_key, options.certificate_chain, options.tls
    )
    if credentials is None:
        return transport.insecure_channel(options.target, options=arguments)
    return transport.secure_channel(options.target, credentials, options=arguments)


def channel_options(
    overrides: ChannelOptions | None = None,
    *,
    retry: bool | RetryPolicy = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    load_balancing: str | None = None,
    health_check: bool = True,
) -> tuple[tuple[str, Any], ...]:
    """Our defaults, then ``overrides`` (raw gRPC channel arguments) on top, by key. The
    retry policy and the load balancing (a policy name, None: gRPC's default) go in one
    ``grpc.service_config``; an override of that key replaces both."""
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        # A response may be larger than its request (Align returns each text with its
        # rewrite); the server bounds it by what it admitted.
        "grpc.max_receive_message_length": -1,
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.max_reconnect_backoff_ms": MAX_RECONNECT_BACKOFF_MS,
        "grpc.enable_retries": 1 if retry else 0,
        # gRPC replays only a call whose request fits this buffer (256 KiB by default: one
        # real image): beyond it the call is committed and a refusal is final. The client
        # holds the request until its answer anyway; this keeps its serialised copy too.
        "grpc.per_rpc_retry_buffer_size": max_message_bytes,
    }
    config = balancing_config(load_balancing, health_check=health_check)
    if retry:
        config.update((retry if isinstance(retry, RetryPolicy) else RetryPolicy()).method_config())
    if config:
        merged["grpc.service_config"] = json.dumps(config)
    merged.update(dict(overrides or {}))
    return tuple(merged.items())


def channel_credentials(
    root_certificates: Pem | None = None,
    private_key: Pem | None = None,
    certificate_chain: Pem | None = None,
    tls: bool | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext.

    ``tls=None`` means TLS exactly when a certificate is given; ``tls=True`` without
    ``root_certificates`` trusts the system roots. A client certificate (mTLS) needs both
    ``private_key`` and ``certificate_chain``.
    """
    if not _wants_tls(root_certificates, private_key, certificate_chain, tls):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(root_certificates),
        private_key=_read_pem(private_key),
        certificate_chain=_read_pem(certificate_chain),
    )


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata. The token goes in plain metadata rather than call credentials so
    that it also reaches servers behind a TLS-terminating proxy on a plaintext channel."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def service_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The generated ``CurationServiceStub`` on ``channel`` (sync or aio alike)."""
    # Imported by name so that mypy does not check the generated .pyi, which only type-checks
    # with grpc's own stubs (types-grpcio); our mypy config treats align2.v1 as Any anyway.
    module = importlib.import_module("align2.v1.curation_pb2_grpc")
    return module.CurationServiceStub(channel)


def _wants_tls(
    root_certificates: Pem | None,
    private_key: Pem | None,
    certificate_chain: Pem | None,
    tls: bool | None,
) -> bool:
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mTLS needs both private_key and certificate_chain")
    given = any(x is not None for x in (root_certificates, private_key, certificate_chain))
    if tls is False and given:
        raise ValueError("certificates were given but tls=False")
    return bool(tls or given)


def _read_pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return pathlib.Path(value).read_bytes()


def _duration(seconds: float) -> str:
    # Service-config durations are JSON protobuf Durations: decimal seconds with an "s".
    return f"{seconds:.3f}s"
