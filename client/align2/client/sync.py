"""The blocking client. Its asyncio twin is :mod:`align2.client.aio`; both share
:mod:`align2.client.calls` and differ only in how an RPC is sent."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from align2.client.base import ClientBase
from align2.client.calls import DEFAULT_HEADS, AlignCall, ChunkedCall, ScoreCall
from align2.client.curate import CurateArgs, CurateResults, CurateStream
from align2.client.health import SERVICE, ServingWait, health_request, health_status
from align2.client.results import (
    AlignReply,
    AlignResult,
    ScoreReply,
    ScoreResult,
)
from align2.client.sync_curate import CurateCall
from align2.client.types import Sample
from align2.v1 import curation_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.12

ReplyT = TypeVar("ReplyT")


class CurationClient(ClientBase):
    """Blocking client of an align2 server; ``target`` and the keyword arguments as in
    :class:`~align2.client.channel.ClientOptions`.

    Chunks of a large input are sent one after another. A failure of a whole RPC raises
    ``grpc.RpcError`` (``.code()``, ``.details()``) and is never swallowed; a failure of one
    sample is an ``ItemError`` value on its result. Use as a context manager, or call
    :meth:`close`.
    """

    def score(
        self,
        samples: Sequence[Sample],
        heads: str | Iterable[str] = DEFAULT_HEADS,
        *,
        timeout: float | None = None,
        priority: str | None = None,
        question_model: str | None = None,
        answer_model: str | None = None,
    ) -> list[ScoreResult]:
        """Reward-model scores: one result per input sample, same order.

        ``heads``: "question" and/or "answer" (ValueError for others); the question head
        alone needs no answers. ``timeout``: deadline of each RPC (None: the client's).
        ``priority``: "interactive" or "bulk" (None: the server's default).
        ``question_model``/``answer_model``: a model name of the server's config (None: its
        default). Raises ``grpc.RpcError`` when an RPC fails as a whole.
        """
        return self.score_with_info(
            samples,
            heads,
            timeout=timeout,
            priority=priority,
            question_model=question_model,
            answer_model=answer_model,
        ).results

    def score_with_info(
        self,
        samples: Sequence[Sample],
        heads: str | Iterable[str] = DEFAULT_HEADS,
        *,
        timeout: float | None = None,
        priority: str | None = None,
        question_model: str | None = None,
        answer_model: str | None = None,
    ) -> ScoreReply:
        """Like :meth:`score`, with the models, template version and timing of the RPCs."""
        call = ScoreCall.plan(
            samples,
            heads,
            chunk_size=self.chunk_size,
            max_message_bytes=self.max_message_bytes,
            priority=priority,
            question_model=question_model,
            answer_model=answer_model,
        )
        return self._send(call, timeout)

    def align(
        self,
        samples: Sequence[Sample],
        *,
        parts: str = "both",
        review: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        template: str | None = None,
        timeout: float | None = None,
        priority: str | None = None,
    ) -> list[AlignResult]:
        """Restyle samples with the server's inner LLM: one result per input, same order.

        Each turn's ``parts`` ("questions", "answers" or "both") are rewritten, checked by
        the guards, then (``review``) the LLM reviews original against rewrite and one is
        kept; ``result.sample`` is the sample as kept. Decoding settings left None take the
        server's defaults (temperature 0 is greedy; ``seed`` makes sampling repeatable).
        ``template``: a template set of the server (None: its default). ``timeout`` and
        ``priority`` as in :meth:`score`. ValueError for a bad argument, before any I/O;
        ``grpc.RpcError`` when an RPC fails as a whole.
        """
        return self.align_with_info(
            samples,
            parts=parts,
            review=review,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            template=template,
            timeout=timeout,
            priority=priority,
        ).results

    def align_with_info(
        self,
        samples: Sequence[Sample],
        *,
        timeout: float | None = None,
        priority: str | None = None,
        **options: Any,
    ) -> AlignReply:
        """Like :meth:`align` (same keyword arguments), with the model, template set, token
        counts and timing of the RPCs."""
        call = AlignCall.plan(
            samples,
            chunk_size=self.chunk_size,
            max_message_bytes=self.max_message_bytes,
            priority=priority,
            **options,
        )
        return self._send(call, timeout)

    def curate(
        self,
        samples: Iterable[Sample],
        *,
        timeout: float | None = None,
        **options: Unpack[CurateArgs],
    ) -> CurateResults:
        """Curate a stream of samples as they are produced: one result per sample, in the
        order the server decides them (each carries its sample's ``id``).

        The server keeps a sample when its question score is among the top
        ``question_keep_fraction`` of its task type in this stream, and its mean answer
        score among the top ``answer_keep_fraction`` of those (None: the server's defaults,
        the method's 0.3 and 0.3); ``align`` restyles the kept ones (``parts``, ``review``
        and the decoding settings as for :meth:`align`); ``priority`` as in :meth:`score`.
        The keyword arguments are :class:`~align2.client.curate.CurateArgs`.

        Selection: ``selection_key`` shares the score windows with every stream of the same
        key on that server (a pipeline's workers select as one; not across replicas).
        ``question_thresholds`` / ``answer_thresholds`` (by task type) decide those tasks
        by ``score >= threshold``, no window: the same on every replica (compute them with
        :mod:`align2.client.calibration`: ``**calibration.thresholds()``). ``min_window``:
        decisions of a task wait until its window holds that many scores (server default
        100; 1: decide at once), or until the stream's in-flight slots all wait or its
        input ended (then ``result.warm_up``). ``question_seed_scores`` /
        ``answer_seed_scores`` fill the windows first (``**calibration.seeds()``).

        ``samples`` is read lazily as the server takes them, so a
        generator producing data works; the server reads ahead at most its
        ``max_stream_inflight``. ``timeout`` is the deadline of the whole call (None: the
        client's).

        ``resume``: when the stream fails with UNAVAILABLE (the server was killed, restarts or
        drains), wait until the server (a replica) reports SERVING and open a new stream
        that sends again only the samples without a decision, then the rest; each sample's
        decision is still yielded once (:class:`~align2.client.resume.ResumePolicy`: how
        long and how often; True, the default: its defaults; False: fail at once). The
        server's selection thresholds start afresh on the new stream. A failure that is not
        resumed raises ``grpc.RpcError``; the samples without a decision are then in
        ``results.unanswered``. ValueError for a bad argument, at once.
        """
        stream = CurateStream.plan(**options)
        stream.max_message_bytes = self.max_message_bytes  # what one sample may take
        deadline = self._options.timeout if timeout is None else timeout
        call = CurateCall(self._curate_rpc, self._check_health, stream, samples, deadline)
        return CurateResults(stream, call.results(), call.cancel)

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """What the server runs: models, versions, limits and batching settings."""
        return self._rpc(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status of ``service`` ("" = the server): "SERVING",
        "NOT_SERVING", ... Raises ``grpc.RpcError`` when the server cannot be reached."""
        return health_status(self._rpc(self._health.Check, health_request(service), timeout))

    def wait_until_serving(self, timeout: float) -> None:
        """Return once the server reports SERVING for the Curate service (gRPC health
        Watch: told at once, no polling), waiting for it to be reachable and to load its
        models; a watch cut by a restart is opened again. TimeoutError after ``timeout``
        seconds; ``grpc.RpcError`` for any other failure (UNAUTHENTICATED, ...)."""
        wait = ServingWait(timeout, self._options.metadata)
        while (watch := wait.watch(self._health)) is not None:
            pause = wait.follow(watch)
            if pause is None:
                return
            time.sleep(pause)
        raise wait.expired()

    def close(self) -> None:
        """Close the channel; RPCs in flight are cancelled. Idempotent."""
        self._channel.close()

    def __enter__(self) -> CurationClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_health(self, timeout: float) -> Any:
        """A health check of the Curate service that waits for a connection (gRPC's
        reconnection, with its backoff), at most ``timeout`` seconds: a cancellable future."""
        return self._health.Check.future(
            health_request(SERVICE),
            timeout=timeout,
            wait_for_ready=True,
            metadata=self._options.metadata,
        )

    def _curate_rpc(self, requests: Iterator[pb.CurateRequest], timeout: float | None) -> Any:
        """A Curate stream: its responses, iterable and cancellable. ``timeout``: seconds
        left of the call's deadline (None: none)."""
        return self._stub.Curate(requests, timeout=timeout, metadata=self._options.metadata)

    def _send(self, call: ChunkedCall[Any, Any, ReplyT], timeout: float | None) -> ReplyT:
        """The chunks of ``call``, one RPC after another."""
        parts = []
        for index in range(len(call.chunks)):
            chunk = call.encode(index)
            response = None
            if chunk.request is not None:
                response = self._rpc(getattr(self._stub, call.method), chunk.request, timeout)
            parts.append(call.decode(chunk, response))
        return call.reply(parts)
