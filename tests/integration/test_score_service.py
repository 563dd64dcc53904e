"""Score end to end: a real server on 127.0.0.1:0 with tiny real models, called through
align2.client."""

from __future__ import annotations

import asyncio
import io
import math
import pathlib
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from support import ServerThread, bound_not_warm, error_details, jpeg, metric, png

from align2.client import AsyncCurationClient, CurationClient, Sample, Turn
from align2.server.backends.base import Prepared
from align2.server.config import Config, ModelConfig
from align2.server.transport import convert
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc


def config_for(question: pathlib.Path, answer: pathlib.Path, **limits: object) -> Config:
    config = Config()
    config.models = {
        "question": ModelConfig(path=str(question)),
        "answer": ModelConfig(path=str(answer)),
    }
    for key, value in limits.items():
        section, field = key.split("__")
        setattr(getattr(config, section), field, value)
    return config


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = config_for(
        tiny_llava,
        tiny_llava,
        limits__max_samples_per_call=8,
        limits__max_image_bytes=200_000,
        limits__max_image_pixels=1_000_000,
        limits__max_candidates=4,
        limits__max_text_bytes=2000,
        limits__max_decoded_image_bytes=64 << 20,
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[CurationClient]:
    with CurationClient(server.target, timeout=60, chunk_size=8) as c:
        yield c


def sample(i: int = 0, turns: int = 2, image: bytes | None = None) -> Sample:
    return Sample(
        id=f"s{i}",
        image=image if image is not None else png(30 + i, 20 + 2 * i),
        task="conversation",
        turns=[
            Turn(f"What is object {j} in picture {i}?", f"It is a red box number {j}." * (1 + j))
            for j in range(turns)
        ],
    )


def test_scores_both_heads_in_input_order(client: CurationClient) -> None:
    samples = [sample(i, turns=1 + i % 3) for i in range(5)]
    reply = client.score_with_info(samples)
    assert [r.id for r in reply.results] == [s.id for s in samples]
    for s, r in zip(samples, reply.results, strict=True):
        assert r.error is None
        assert r.question_score is not None and math.isfinite(r.question_score)
        assert len(r.answer_scores) == len(s.turns)
        assert r.answer_score == pytest.approx(sum(r.answer_scores) / len(r.answer_scores))
        assert r.answer_truncated == (False,) * len(s.turns)
    assert reply.template_version == "align2llava-reward-v1"
    assert reply.question_model is not None and reply.question_model.name == "question"
    assert reply.answer_model is not None and reply.answer_model.backend == "transformers"
    assert len(reply.question_model.revision) >= 8
    info = {m.ref.name: m.ref for m in client.server_info().models}
    assert reply.question_model.settings == info["question"].settings
    assert len(reply.question_model.settings) == 12  # ModelRef.settings, as GetServerInfo


def test_a_setting_that_changes_scores_changes_the_reported_settings(
    server: ServerThread, tiny_llava: pathlib.Path
) -> None:
    """The same checkpoint under other score-changing settings (EXIF transposition,
    truncation, image_mode, dtype) reports the same revision and other settings, so stored
    scores keyed on both are not reused (the client's score files). Fails on: settings
    missing any of them (a researcher who switches to the reference's settings and reruns
    would get the old scores back)."""
    with CurationClient(server.target, timeout=60) as client:
        [base] = [m.ref for m in client.server_info().models if m.ref.name == "question"]
    changes: list[dict[str, object]] = [
        {"score__image_exif_transpose": True},
        {"limits__truncation": "truncate"},
    ]
    seen = {base.settings}
    for change in changes:
        other = ServerThread(config_for(tiny_llava, tiny_llava, **change)).start()
        try:
            with CurationClient(other.target, timeout=60) as client:
                [ref] = [m.ref for m in client.server_info().models if m.ref.name == "question"]
        finally:
            other.stop()
        assert ref.revision == base.revision
        assert ref.settings not in seen, change
        seen.add(ref.settings)


def test_compute_time_is_wall_time_never_more_than_the_call(client: CurationClient) -> None:
    # Both heads' batches run on two model threads at once: their passes overlap.
    started = time.monotonic()
    reply = client.score_with_info([sample(i, turns=3) for i in range(6)])
    elapsed = time.monotonic() - started
    assert 0 < reply.timing.compute_seconds <= elapsed
    assert 0 <= reply.timing.queue_seconds <= elapsed


def test_question_head_alone_needs_no_answers(client: CurationClient) -> None:
    s = Sample(id="q", image=jpeg(), turns=[Turn("Why is the sky blue?"), Turn("And red?")])
    [result] = client.score([s], heads=["question"])
    assert result.error is None
    assert result.question_score is not None
    assert result.answer_scores == () and result.answer_score is None


def test_candidates_score_as_if_each_were_the_turns_only_answer(client: CurationClient) -> None:
    """Each candidate is scored alone, as a turn of its own would be; the turn's score is
    the best (highest, first among equal highest), the sample's the mean of the bests."""
    question, other = "<image>\nWhat is object 1 in picture 3?", ("And the other?", "A ball.")
    answers = ("It is a red box.", "A box, red, number one, on a table.", "No.", "It is a red box.")
    image = png(33, 26)
    candidates = Sample(
        id="c", image=image, turns=[Turn(question, candidates=answers), Turn(*other)]
    )
    separate = Sample(
        id="t", image=image, turns=[*(Turn(question, a) for a in answers), Turn(*other)]
    )
    plain = Sample(id="p", image=image, turns=[Turn(question, answers[0]), Turn(*other)])
    c, t, p = client.score([candidates, separate, plain])
    assert c.error is None and t.error is None and p.error is None
    first, second = c.answer_candidates
    # Scores of the same inputs in other batches: equal to 1e-5 (padding), never the same call.
    assert first.scores == pytest.approx(t.answer_scores[:4], abs=1e-5)
    assert second.scores == pytest.approx(t.answer_scores[4:], abs=1e-5)
    assert first.truncated == (False,) * 4 and second.truncated == (False,)
    highest = max(first.scores)
    assert first.best == first.scores.index(highest) and second.best == 0
    assert c.best_candidates == (first.best, 0)
    assert c.answer_scores == (highest, second.scores[0])
    assert c.answer_score == pytest.approx((highest + second.scores[0]) / 2, abs=1e-6)
    assert c.answer_truncated == (False, False)
    # The question head reads no answer: candidates or not, the same question score.
    assert c.question_score == pytest.approx(p.question_score, abs=1e-5)
    assert t.answer_candidates == () and p.answer_candidates == ()  # none sent, none reported


def test_candidates_beyond_the_limit_or_beside_an_answer_fail_alone(
    client: CurationClient,
) -> None:
    samples = [
        Sample(id="five", image=png(), turns=[Turn("Q?", candidates=tuple("abcde"))]),
        Sample(id="both", image=png(), turns=[Turn("Q?", "A."), Turn("R?", "A.", ("B.",))]),
        Sample(id="blank", image=png(), turns=[Turn("Q?", candidates=("B.", " <image> ", ""))]),
        Sample(id="four", image=png(), turns=[Turn("Q?", candidates=tuple("abcd"))]),
    ]
    five, both, blank, four = client.score(samples)
    assert four.error is None and len(four.answer_candidates[0].scores) == 4
    for result, message in [
        (
            five,
            "samples[0].turns[0].answer_candidates: 5 candidates exceeds limits.max_candidates 4",
        ),
        (both, "samples[1].turns[1].answer: set together with answer_candidates"),
    ]:
        assert result.error is not None and result.error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert result.error.message.startswith(message), result.error.message
    # Blank and empty candidates are scored as the reference scores them: a blank one as
    # "...Answer:", an empty one as the question head's text (both heads are one model here).
    assert blank.error is None
    given, blank_one, empty_one = blank.answer_candidates[0].scores
    assert empty_one == pytest.approx(blank.question_score, abs=1e-5)
    assert len({round(x, 4) for x in (given, blank_one, empty_one)}) == 3
    # The question head alone reads no candidates, but the limit holds.
    five, blank = client.score([samples[0], samples[2]], heads=["question"])
    assert five.error is not None and "limits.max_candidates 4" in five.error.message
    assert blank.error is None and blank.answer_candidates == ()


def test_texts_over_the_byte_limit_or_with_a_nested_marker_fail_alone(
    client: CurationClient,
) -> None:
    """Checked before anything is tokenised: each text's UTF-8 bytes, the questions together
    (the question head's one text), and a marker nested in another, which would leave an
    ``<image>`` once the markers are removed (the model would see a second image)."""
    good = sample(0, turns=1)
    samples = [
        Sample(id="long-q", image=png(), turns=[Turn("é" * 1001, "A.")]),  # 2002 bytes
        Sample(id="long-c", image=png(), turns=[Turn("Q?", candidates=("B.", "w" * 2001))]),
        Sample(id="joined", image=png(), turns=[Turn("x" * 1000, "A."), Turn("y" * 1000, "A.")]),
        Sample(id="nested-q", image=png(), turns=[Turn("<ima<image>ge> What is it?", "A.")]),
        Sample(id="nested-a", image=png(), turns=[Turn("What is it?", "<<image>image>")]),
        good,
    ]
    *bad, kept = client.score(samples)
    for result, message in zip(
        bad,
        [
            "samples[0].turns[0].question: 2002 bytes (UTF-8) exceeds limits.max_text_bytes 2000",
            "samples[1].turns[0].answer_candidates[1]: at least 2001 bytes (UTF-8; 2001 "
            "characters) exceeds limits.max_text_bytes 2000",
            "samples[2].turns: the questions together are 2001 bytes",
            "samples[3].turns[0].question: still holds <image> once its <image> markers",
            "samples[4].turns[0].answer: still holds <image>",
        ],
        strict=True,
    ):
        assert result.error is not None and result.error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert result.error.message.startswith(message), result.error.message
    [alone] = client.score([good])
    assert kept.error is None and kept.question_score == pytest.approx(
        alone.question_score, abs=1e-5
    )
    # At the limit exactly: accepted (1000 + "\n" + 999 bytes together).
    [edge] = client.score(
        [Sample(id="edge", image=png(), turns=[Turn("x" * 1000, "A."), Turn("y" * 999, "A.")])]
    )
    assert edge.error is None, edge.error


def test_scores_do_not_depend_on_batch_mates_or_concurrency(
    server: ServerThread, client: CurationClient
) -> None:
    samples = [sample(i, turns=1 + i % 4) for i in range(8)]
    alone = [client.score([s])[0] for s in samples]

    async def concurrently() -> list:
        async with AsyncCurationClient(server.target, timeout=60) as aclient:
            groups = await asyncio.gather(*(aclient.score(samples) for _ in range(4)))
        return [r for g in groups for r in g]

    together = asyncio.run(concurrently())
    for i, r in enumerate(together):
        ref = alone[i % len(samples)]
        assert r.question_score == pytest.approx(ref.question_score, abs=1e-5)
        assert r.answer_scores == pytest.approx(ref.answer_scores, abs=1e-5)


def test_bad_items_fail_alone_with_field_named(client: CurationClient) -> None:
    big = png(1200, 1000)  # 1.2 MP > max_image_pixels 1e6
    samples = [
        sample(0),
        Sample(id="corrupt", image=b"\x89PNG\r\n\x1a\nnot really", turns=[Turn("Q?", "A.")]),
        Sample(id="empty-conv", image=png(), turns=[]),
        Sample(id="empty-q", image=png(), turns=[Turn("What?", "A."), Turn("  <image> ", "B.")]),
        Sample(id="pixels", image=big, turns=[Turn("Q?", "A.")]),
        Sample(id="no-answer", image=png(), turns=[Turn("Q?", "")]),  # scored, as the method
        Sample(id="gif", image=_gif(), turns=[Turn("Q?", "A.")]),
        sample(7),
        # 12,000 pixels, but the model pads it to 1200 x 1200 = 1.44 MP (image_mode pad).
        Sample(id="thin", image=png(10, 1200), turns=[Turn("Q?", "A.")]),
    ]
    results = client.score(samples)
    by_id = {r.id: r for r in results}
    assert by_id["s0"].error is None and by_id["s7"].error is None
    expect = {
        "corrupt": "samples[1].image: not a readable JPEG, PNG or WebP",
        "empty-conv": "samples[2].turns: empty conversation",
        "empty-q": "samples[3].turns[1].question: empty",
        "pixels": "samples[4].image: 1200x1000 = 1200000 pixels exceeds limits.max_image_pixels",
        "gif": "samples[6].image: not a readable JPEG, PNG or WebP",
        # In the second chunk (8 per call), named by its place in the list passed.
        "thin": "samples[8].image: 10x1200 pads to a 1200x1200 square = 1440000 pixels",
    }
    for key, message in expect.items():
        error = by_id[key].error
        assert error is not None, key
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.message, (key, error.message)
        assert by_id[key].question_score is None
    unanswered = by_id["no-answer"]  # the reference reads "<image>\nQ?": the question's text
    assert unanswered.error is None
    assert unanswered.answer_scores[0] == pytest.approx(unanswered.question_score, abs=1e-5)


def test_oversized_image_bytes_fail_alone(client: CurationClient) -> None:
    heavy = jpeg(700, 700, seed=1)
    assert len(heavy) > 200_000
    results = client.score([sample(1), Sample(id="heavy", image=heavy, turns=[Turn("Q?", "A.")])])
    assert results[0].error is None
    assert results[1].error is not None
    assert "exceeds limits.max_image_bytes 200000" in results[1].error.message


def test_an_image_marker_the_server_does_not_know_fails_nothing(server: ServerThread) -> None:
    """The server does not use image_marker: a value from a newer client is ignored, and
    its sample scores as the same sample without it."""
    turns = [pb.Turn(question="Q?", answer="A.")]
    samples = [
        pb.Sample(id=i, image=png(), image_marker=m, turns=turns) for i, m in [("a", 0), ("b", 9)]
    ]
    with grpc.insecure_channel(server.target) as channel:
        a, b = pb_grpc.CurationServiceStub(channel).Score(pb.ScoreRequest(samples=samples)).results
    assert not a.HasField("error") and not b.HasField("error")
    assert b.question_score == pytest.approx(a.question_score, abs=1e-5)


def test_exif_orientation_is_ignored_unless_configured(
    server: ServerThread, tiny_llava: pathlib.Path
) -> None:
    stored = Image.effect_noise((48, 24), 60).convert("RGB")
    turned = stored.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 displays

    def encoded(image: Image.Image, orientation: int | None = None) -> bytes:
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", exif=exif.tobytes())
        return buffer.getvalue()

    def scores(target: str, *images: bytes) -> list[float | None]:
        with CurationClient(target, timeout=60) as c:
            samples = [
                Sample(id=str(i), image=im, turns=[Turn("Q?", "A.")]) for i, im in enumerate(images)
            ]
            return [r.question_score for r in c.score(samples, heads=["question"])]

    tagged = encoded(stored, orientation=6)
    default = scores(server.target, tagged, encoded(stored), encoded(turned))
    assert default[0] == pytest.approx(default[1], abs=1e-6)  # the stored pixels, as the
    assert default[0] != pytest.approx(default[2], abs=1e-6)  # reference code reads them
    transposing = ServerThread(
        config_for(tiny_llava, tiny_llava, score__image_exif_transpose=True)
    ).start()
    try:
        [applied] = scores(transposing.target, tagged)
    finally:
        transposing.stop()
    assert applied == pytest.approx(default[2], abs=1e-6)  # as displayed


def test_too_many_samples_fails_the_call(server: ServerThread) -> None:
    with (
        CurationClient(server.target, chunk_size=100) as big_chunks,
        pytest.raises(grpc.RpcError) as info,
    ):
        big_chunks.score([sample(i, turns=1) for i in range(9)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "samples: 9 samples exceeds limits.max_samples_per_call 8" in info.value.details()
    assert _violations(info.value) == [("samples", info.value.details())]


def test_unknown_head_and_unknown_model(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.CurationServiceStub(channel)
        request = pb.ScoreRequest(samples=[pb.Sample(id="x", image=png())], heads=[1, 7])
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "heads[1]: unknown head 7" in info.value.details()
        assert _violations(info.value) == [("heads[1]", info.value.details())]
    with CurationClient(server.target) as c, pytest.raises(grpc.RpcError) as info:
        c.score([sample()], question_model="nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "question_model: unknown model 'nope'; loaded: answer, question" in info.value.details()
    details = error_details(info.value)
    resource = details["ResourceInfo"]
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("model", "nope")
    assert resource.description == info.value.details()
    assert "BadRequest" not in details and "RetryInfo" not in details
    with pytest.raises(ValueError, match="head"):
        CurationClient(server.target).score([sample()], heads=["questions"])


def test_full_queue_refuses_at_once_before_decoding(server: ServerThread) -> None:
    batcher = server.app._runtimes["question"].batcher
    held = server.call(_reserve(batcher, batcher.max_queue))
    try:
        corrupt = Sample(id="c", image=b"junk", turns=[Turn("Q?", "A.")])
        with CurationClient(server.target, retry=False) as c, pytest.raises(grpc.RpcError) as info:
            c.score([corrupt])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "is full" in info.value.details()
        details = error_details(info.value)
        # The delay of its turn (tests/integration/test_backpressure.py), said twice.
        trailers = dict(info.value.trailing_metadata() or ())  # type: ignore[attr-defined]
        pushback = int(trailers["grpc-retry-pushback-ms"])
        assert pushback > 0 and _retry_delay(details) == pushback / 1000
        reason = details["ErrorInfo"]
        assert isinstance(reason, error_details_pb2.ErrorInfo)
        assert (reason.reason, reason.domain) == ("OVERLOADED", "align2.v1")
        assert trailers.get("x-request-id")  # the details do not replace the request id
    finally:
        server.call(_release(held))
    with CurationClient(server.target) as c:
        assert c.score([sample()])[0].error is None


def test_deadline_exceeded(server: ServerThread) -> None:
    with CurationClient(server.target, retry=False) as c, pytest.raises(grpc.RpcError) as info:
        c.score([sample(i, turns=4) for i in range(8)], timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_same_folder_for_both_heads_is_loaded_once(server: ServerThread) -> None:
    runtimes = server.app._runtimes
    assert runtimes["question"] is runtimes["answer"]


def test_server_info_reports_models_limits_batching(client: CurationClient) -> None:
    info = client.server_info()
    assert {m.ref.name for m in info.models} == {"question", "answer"}
    model = info.models[0]
    assert model.family == "llava" and model.image_tokens == 16 and model.image_mode == "pad"
    assert info.limits.max_samples_per_call == 8
    assert info.limits.max_image_pixels == 1_000_000
    assert info.limits.max_streams == 100
    assert info.limits.max_candidates == 4
    assert info.limits.max_text_bytes == 2000
    assert info.limits.max_decoded_image_bytes == 64 << 20
    assert info.batching.max_batch_size == 32
    assert info.template_version == "align2llava-reward-v1"
    assert "Score" in info.services


def test_health_serving_per_service_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "align2.v1.CurationService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {"align2.v1.CurationService", "grpc.health.v1.Health"} <= names
        # List, which the library's servicer left unimplemented (reflection advertises it)
        listed = health.List(health_pb2.HealthListRequest()).statuses
        assert {name: s.status for name, s in listed.items()} == {
            "": health_pb2.HealthCheckResponse.SERVING,
            "align2.v1.CurationService": health_pb2.HealthCheckResponse.SERVING,
        }
        # The error details' types, so that a reflection-only caller can decode them.
        for request in (
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="google.rpc.BadRequest"),
            reflection_pb2.ServerReflectionRequest(file_by_filename="google/rpc/status.proto"),
        ):
            [found] = list(refl.ServerReflectionInfo(iter([request])))
            files = found.file_descriptor_response.file_descriptor_proto
            assert files, found.error_response.error_message
            protos = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
            assert protos[0].name.startswith("google/rpc/")


def test_health_not_serving_until_warm(tiny_llava: pathlib.Path) -> None:
    """Between bind and warm-up the health service says NOT_SERVING and Score UNAVAILABLE."""

    async def scenario() -> None:
        async with bound_not_warm(config_for(tiny_llava, tiny_llava)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = pb_grpc.CurationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Score(pb.ScoreRequest(samples=[pb.Sample(id="x")]))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "warming up" in (info.value.details() or "")
            assert _retry_delay(error_details(info.value)) == 1.0

    asyncio.run(scenario())


def _violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of a failed call's BadRequest detail."""
    bad = error_details(error)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    return [(v.field, v.description) for v in bad.field_violations]


def _retry_delay(details: dict) -> float:
    retry = details["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    return float(retry.retry_delay.ToTimedelta().total_seconds())


def _gif() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


async def _reserve(batcher, count):  # type: ignore[no-untyped-def]
    return batcher.reserve(count)


async def _release(reservation):  # type: ignore[no-untyped-def]
    reservation.release()


def test_health_command_and_client_method(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    from align2.client.cli import main

    assert (
        main(["health", "--target", server.target, "--service", "align2.v1.CurationService"]) == 0
    )
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--target", server.target, "--service", "no.such.Service"]) == 1

    async def check() -> str:
        async with AsyncCurationClient(server.target) as aclient:
            return await aclient.health()

    assert asyncio.run(check()) == "SERVING"


def test_tokens_a_reward_model_skips_are_counted(server: ServerThread) -> None:
    """align2_skipped_tokens_total: the turns of one conversation share the image prefix
    (shared_prefix), and a batch of a short and a very long question (length-aware
    forwards, the tiny model's 16 image tokens) skips padding. Equal to what the backends
    counted themselves."""

    def skipped(model: str, reason: str) -> float:
        return metric("align2_skipped_tokens_total", model=model, reason=reason)

    # Both heads are the same folder here: one backend, labelled with the name it loaded as.
    backend = server.app._runtimes["answer"].backend
    assert backend is server.app._runtimes["question"].backend
    model = backend.description.name
    before = {reason: skipped(model, reason) for reason in ("shared_prefix", "padding")}
    prefix, padding = backend.prefix_tokens_saved, backend.padded_tokens_saved
    long_question = " ".join(f"What is thing {j} on the left side?" for j in range(40))

    def prepared(text: str, image: bytes) -> Prepared:
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        return backend.prepare(f"<image>\n{text}", picture, max_text_tokens=2048, truncate=False)

    # Each batch given to the backend as one (through the client, batch-mates depend on
    # when each input's preparation ends): two answers on one image, then a short and a
    # long question on two images.
    one = png(30, 20)
    turns = [prepared(f"Question: What is it?\nAnswer: {a}", one) for a in ("A box.", "Red.")]
    server.call(backend.score(turns))
    server.call(
        backend.score([prepared("What?", png(31, 22)), prepared(long_question, png(41, 33))])
    )

    shared = skipped(model, "shared_prefix") - before["shared_prefix"]
    padded = skipped(model, "padding") - before["padding"]
    assert shared == backend.prefix_tokens_saved - prefix > 0
    assert padded == backend.padded_tokens_saved - padding > 0


def test_an_internal_error_keeps_the_callers_request_id(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server bug is INTERNAL, and its trailers still carry the x-request-id that finds
    the call's log lines."""

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(convert, "score_call_from_proto", broken)
    metadata = (("x-request-id", "job-7"),)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CurationServiceStub(channel).Score(pb.ScoreRequest(), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error: RuntimeError: boom"
    trailers = dict(info.value.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert trailers["x-request-id"] == "job-7"


def test_a_refused_call_keeps_the_callers_request_id(server: ServerThread) -> None:
    """An align2 error (here INVALID_ARGUMENT) replaces the trailers set before it: the
    x-request-id is passed again with the status details."""
    metadata = (("x-request-id", "job-8"),)
    request = pb.ScoreRequest(heads=[pb.HEAD_QUESTION, 7])  # an unknown head: the caller's
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CurationServiceStub(channel).Score(request, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "heads[1]" in info.value.details()
    trailers = dict(info.value.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert trailers["x-request-id"] == "job-8"
    assert "grpc-status-details-bin" in trailers  # the rich status is still there
