"""How the client connects: channel options, retries, TLS and the bearer token.

Retries are gRPC's own (a service-config ``retryPolicy``), not a loop of ours: gRPC only
replays an attempt the server has not answered, honours the call's deadline across attempts
and applies exponential backoff with jitter. Both the sync and the asyncio client open their
channel from the same :class:`ChannelSettings`.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

SERVICE = "align2.v1.CurationService"
# Unary RPCs only: a replayed Curate stream could be decided twice. Score and GetServerInfo
# have no side effects; Align regenerates, which is what a caller retrying would get too.
RETRIED_METHODS = ("Score", "Align", "GetServerInfo")
# 64 samples with their images fit comfortably; servers announce their own limit in
# GetServerInfoResponse.limits.max_message_bytes.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Not shorter than a stock gRPC server's minimum ping interval (5 min): shorter keepalives
# during long calls earn a GOAWAY "too_many_pings" from servers with default settings.
KEEPALIVE_TIME_MS = 300_000
KEEPALIVE_TIMEOUT_MS = 20_000
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

    def service_config(self) -> str:
        """The ``grpc.service_config`` JSON applying this policy to :data:`RETRIED_METHODS`."""
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff_seconds),
            "maxBackoff": _duration(self.max_backoff_seconds),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.codes),
        }
        names = [{"service": SERVICE, "method": method} for method in RETRIED_METHODS]
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclass(frozen=True)
class ChannelSettings:
    """Everything needed to open a channel and authenticate its calls."""

    target: str
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    metadata: tuple[tuple[str, str], ...]  # sent with every call


def channel_settings(
    target: str,
    *,
    token: str | None = None,
    root_certificates: Pem | None = None,
    private_key: Pem | None = None,
    certificate_chain: Pem | None = None,
    tls: bool | None = None,
    options: ChannelOptions | None = None,
    retry: bool | RetryPolicy = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> ChannelSettings:
    """Build the settings; see :class:`align2.client.CurationClient` for the arguments."""
    return ChannelSettings(
        target=target,
        options=channel_options(options, retry=retry, max_message_bytes=max_message_bytes),
        credentials=channel_credentials(root_certificates, private_key, certificate_chain, tls),
        metadata=call_metadata(token),
    )


def channel_options(
    overrides: ChannelOptions | None = None,
    *,
    retry: bool | RetryPolicy = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[tuple[str, Any], ...]:
    """Our defaults, then ``overrides`` (raw gRPC channel arguments) on top, by key."""
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.enable_retries": 1 if retry else 0,
    }
    if retry:
        policy = retry if isinstance(retry, RetryPolicy) else RetryPolicy()
        merged["grpc.service_config"] = policy.service_config()
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
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mTLS needs both private_key and certificate_chain")
    given = any(x is not None for x in (root_certificates, private_key, certificate_chain))
    if tls is False and given:
        raise ValueError("certificates were given but tls=False")
    if not (tls or given):
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


def open_channel(settings: ChannelSettings) -> grpc.Channel:
    if settings.credentials is None:
        return grpc.insecure_channel(settings.target, options=settings.options)
    return grpc.secure_channel(settings.target, settings.credentials, options=settings.options)


def open_aio_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    """Call from inside the event loop that will use the channel."""
    if settings.credentials is None:
        return grpc.aio.insecure_channel(settings.target, options=settings.options)
    return grpc.aio.secure_channel(settings.target, settings.credentials, options=settings.options)


def service_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The generated ``CurationServiceStub`` on ``channel`` (sync or aio alike)."""
    # Imported by name so that mypy does not check the generated .pyi, which only type-checks
    # with grpc's own stubs (types-grpcio); our mypy config treats align2.v1 as Any anyway.
    module = importlib.import_module("align2.v1.curation_pb2_grpc")
    return module.CurationServiceStub(channel)


def _read_pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return pathlib.Path(value).read_bytes()


def _duration(seconds: float) -> str:
    # Service-config durations are JSON protobuf Durations: decimal seconds with an "s".
    return f"{seconds:.3f}s"
