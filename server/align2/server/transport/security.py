"""TLS / mutual TLS credentials and bearer-token authentication for the gRPC port."""

from __future__ import annotations

import hmac
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from align2.server.config import SecurityConfig
from align2.server.errors import ConfigError, Unauthenticated
from align2.server.transport.errors import abort
from align2.server.transport.interceptors import rewrap

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_DENIED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def _read(path: str, key: str) -> bytes:
    try:
        return pathlib.Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"security.{key}: cannot read {path}: {exc}") from None


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual when a client CA is set), or None for plaintext."""
    if not config.tls:
        return None
    pair = (
        _read(config.tls_key_file, "tls_key_file"),
        _read(config.tls_cert_file, "tls_cert_file"),
    )
    client_ca = (
        _read(config.tls_client_ca_file, "tls_client_ca_file")
        if config.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_tokens(config: SecurityConfig) -> list[bytes]:
    """The accepted tokens (one per line, blank lines and # comments skipped)."""
    if not config.auth_tokens_file:
        return []
    lines = _read(config.auth_tokens_file, "auth_tokens_file").decode().splitlines()
    tokens = [line.strip().encode() for line in lines if line.strip() and not line.startswith("#")]
    if not tokens:
        raise ConfigError(f"security.auth_tokens_file: {config.auth_tokens_file} has no token")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <token>`` names an accepted token.

    Every accepted token is compared (constant time each) so the time taken does not say
    which one nearly matched. Health checks may stay open for probes.
    """

    def __init__(self, tokens: Iterable[bytes], *, open_health: bool) -> None:
        self._tokens = list(tokens)
        self._open_health = open_health

    def _allowed(self, metadata: Iterable[tuple[str, Any]]) -> bool:
        header = next((v for k, v in metadata if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, token = str(header).partition(" ")
        presented = token.strip().encode()
        match = False
        for accepted in self._tokens:
            match |= hmac.compare_digest(presented, accepted)
        return match and scheme.lower() == "bearer"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or (self._open_health and method.startswith(HEALTH_PREFIX)):
            return handler
        if self._allowed(handler_call_details.invocation_metadata or ()):
            return handler
        return rewrap(handler, method, _deny_unary, _deny_stream)


async def _abort(context: grpc.aio.ServicerContext) -> None:
    """UNAUTHENTICATED with its google.rpc.Status (ErrorInfo), as every align2 error has:
    reflection and health are outside StatusInterceptor, so the status is made here,
    keeping the trailers set before (the call's x-request-id)."""
    kept = tuple(context.trailing_metadata() or ())
    await abort(context, Unauthenticated(_DENIED, field=None), kept)


def _deny_unary(_rpc: str, _behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _abort(context)

    return deny


def _deny_stream(_rpc: str, _behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _abort(context)
        yield  # pragma: no cover  (makes this an async generator, as the handler kind needs)

    return deny
