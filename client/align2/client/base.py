"""What the sync and asyncio clients share: their options, channel, stubs and how an RPC is
started (deadline and metadata)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from align2.client.balancing import PICK_FIRST, target_string
from align2.client.channel import ClientArgs, ClientOptions, open_channel, service_stub
from align2.client.health import health_stub

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.12


class ClientBase:
    """A client of an align2 server (``align2.v1.CurationService``): ``target`` and the
    keyword arguments are the fields of :class:`~align2.client.channel.ClientOptions`;
    ``target`` may also list replicas (``["10.0.0.5:50051", "10.0.0.6:50051"]``), whose
    calls are then balanced round_robin.

    The twins set ``_aio`` and send their RPCs with :meth:`_rpc`; everything else about
    connecting is here.
    """

    _aio: ClassVar[bool] = False  # the asyncio twin opens a grpc.aio channel

    def __init__(self, target: str | Sequence[str], **options: Unpack[ClientArgs]) -> None:
        self._options = ClientOptions(target_string(target), **options)
        self._channel = open_channel(self._options, aio=self._aio)
        self._stub = service_stub(self._channel)
        self._health = health_stub(self._channel)

    @property
    def target(self) -> str:
        return self._options.target

    @property
    def load_balancing(self) -> str:
        """The channel's load-balancing policy: "round_robin" or "pick_first"."""
        return self._options.policy or PICK_FIRST

    @property
    def chunk_size(self) -> int:
        return self._options.chunk_size

    @property
    def max_message_bytes(self) -> int:
        return self._options.max_message_bytes

    def _rpc(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """Start ``method`` (a stub's) with the call's deadline (``timeout``, else the
        client's) and the client's metadata: the response of a sync stub, an awaitable call
        of an aio one."""
        deadline = self._options.timeout if timeout is None else timeout
        return method(request, timeout=deadline, metadata=self._options.metadata)
