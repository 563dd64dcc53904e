"""What the sync and asyncio clients share: connection settings, chunk size and deadlines."""

from __future__ import annotations

from align2.client.calls import DEFAULT_CHUNK_SIZE
from align2.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelOptions,
    ChannelSettings,
    Pem,
    RetryPolicy,
    channel_settings,
)


class ClientBase:
    """Settings of a client of an align2 server (``align2.v1.CurationService``).

    Args:
        target: ``host:port`` (any gRPC target string).
        timeout: default deadline of each RPC in seconds (None: no deadline); a call's
            ``timeout`` argument overrides it. Retries happen within the deadline.
        chunk_size: most samples per RPC (the server's default ``max_samples_per_call``);
            larger inputs are sent as several RPCs and their results concatenated.
        token: sent with every call as ``authorization: Bearer <token>`` metadata.
        root_certificates, private_key, certificate_chain: PEM bytes or file paths; any of
            them switches the channel to TLS, key and chain together to mutual TLS.
        tls: True for TLS with the system roots when no certificate is given.
        options: raw gRPC channel arguments, applied over ours.
        retry: gRPC's own retry of UNAVAILABLE and RESOURCE_EXHAUSTED with exponential
            backoff (True: :class:`RetryPolicy` defaults; False: no retry).
        max_message_bytes: send and receive limit of the channel.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        token: str | None = None,
        root_certificates: Pem | None = None,
        private_key: Pem | None = None,
        certificate_chain: Pem | None = None,
        tls: bool | None = None,
        options: ChannelOptions | None = None,
        retry: bool | RetryPolicy = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size: {chunk_size} is not positive")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout: {timeout} is not positive")
        self._settings: ChannelSettings = channel_settings(
            target,
            token=token,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            tls=tls,
            options=options,
            retry=retry,
            max_message_bytes=max_message_bytes,
        )
        self._timeout = timeout
        self._chunk_size = chunk_size
        self._connect()

    def _connect(self) -> None:
        """Open the channel and stub from ``self._settings`` (the one transport difference)."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        return self._settings.target

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout
