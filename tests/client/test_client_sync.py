"""CurationClient against the fake servicer: order, chunking, item errors, retries, deadlines,
metadata."""

from __future__ import annotations

import pathlib
import threading

import grpc
import pytest
from client_fakes import FAST_RETRY, FakeCuration, make_samples

from align2.client import (
    CurationClient,
    ItemError,
    ProtocolError,
    RetryPolicy,
    Sample,
    ScoreResult,
    Turn,
)
from align2.v1 import curation_pb2 as pb


def client_for(fake: FakeCuration, **kwargs: object) -> CurationClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return CurationClient(fake.target, **kwargs)  # type: ignore[arg-type]


def test_results_in_input_order_across_chunks(fake: FakeCuration) -> None:
    samples = make_samples(10)
    with client_for(fake, chunk_size=3) as client:
        results = client.score(samples)
    assert [len(r.samples) for r in fake.requests] == [3, 3, 3, 1]
    assert [r.id for r in results] == [s.id for s in samples]
    assert [r.question_score for r in results] == [float(i) for i in range(10)]
    assert results[4].answer_scores == (5.0,)
    assert results[4].answer_score == 5.0


def test_empty_input_makes_no_call(fake: FakeCuration) -> None:
    with client_for(fake) as client:
        assert client.score([]) == []
    assert fake.attempts == 0


def test_heads_are_sent_and_question_head_needs_no_answers(fake: FakeCuration) -> None:
    sample = Sample(id="7", image=b"png", turns=[Turn("What is shown?")])
    with client_for(fake) as client:
        [both] = client.score([sample])
        [question] = client.score([sample], heads=["question"])
    assert list(fake.requests[0].heads) == [pb.HEAD_QUESTION, pb.HEAD_ANSWER]
    assert list(fake.requests[1].heads) == [pb.HEAD_QUESTION]
    assert question == ScoreResult(id="7", question_score=7.0)
    assert both.answer_scores == (0.0,)


def test_unknown_head_is_rejected_before_any_call(fake: FakeCuration) -> None:
    with (
        client_for(fake) as client,
        pytest.raises(ValueError, match=r"valid heads are \[.answer., .question.\]"),
    ):
        client.score(make_samples(1), heads=["questions"])
    assert fake.attempts == 0


def test_request_options_are_sent(fake: FakeCuration) -> None:
    with client_for(fake) as client:
        client.score(
            make_samples(1), priority="interactive", question_model="qm", answer_model="am"
        )
    [request] = fake.requests
    assert request.priority == pb.PRIORITY_INTERACTIVE
    assert (request.question_model, request.answer_model) == ("qm", "am")


def test_item_errors_are_values(fake: FakeCuration) -> None:
    samples = make_samples(3)
    samples[1].id = "bad1"
    with client_for(fake) as client:
        results = client.score(samples)
    assert results[1] == ScoreResult(
        id="bad1", error=ItemError(grpc.StatusCode.INVALID_ARGUMENT, "samples[1].image: bad")
    )
    assert results[0].ok and results[2].ok and not results[1].ok


def test_image_paths_are_read_when_sent(fake: FakeCuration, tmp_path: pathlib.Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG bytes")
    sample = Sample(id="1", image=image, turns=[Turn("q", "a")])
    with client_for(fake) as client:
        client.score([sample])
    assert fake.requests[0].samples[0].image == b"\x89PNG bytes"


def test_unreadable_image_fails_its_item_only(fake: FakeCuration, tmp_path: pathlib.Path) -> None:
    samples = make_samples(3)
    samples[1].image = tmp_path / "missing.png"
    with client_for(fake) as client:
        results = client.score(samples)
    assert [s.id for s in fake.requests[0].samples] == ["0", "2"]
    assert [r.id for r in results] == ["0", "1", "2"]
    assert results[1].error is not None
    assert results[1].error.code == grpc.StatusCode.NOT_FOUND
    assert "missing.png" in results[1].error.message
    assert results[2].question_score == 2.0


def test_chunk_without_readable_images_makes_no_call(
    fake: FakeCuration, tmp_path: pathlib.Path
) -> None:
    samples = make_samples(2)
    for sample in samples:
        sample.image = tmp_path / "missing.png"
    with client_for(fake) as client:
        results = client.score(samples)
    assert fake.attempts == 0
    assert all(r.error and r.error.code == grpc.StatusCode.NOT_FOUND for r in results)


def test_score_with_info_reports_models_template_and_timing(fake: FakeCuration) -> None:
    with client_for(fake, chunk_size=2) as client:
        reply = client.score_with_info(make_samples(4))
    assert len(reply.results) == 4
    assert [c.size for c in reply.calls] == [2, 2]
    assert reply.question_model is not None and reply.question_model.model_id == "fake-q"
    assert reply.answer_model is not None and reply.answer_model.revision == "r2"
    assert reply.template_version == "t1"
    assert (reply.timing.queue_seconds, reply.timing.compute_seconds) == (1.0, 2.0)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retries_transient_failures(fake: FakeCuration, code: grpc.StatusCode) -> None:
    fake.fail_next = [code]
    with client_for(fake) as client:
        [result] = client.score(make_samples(1))
    assert fake.attempts == 2
    assert result.ok


def test_a_request_larger_than_grpcs_default_retry_buffer_is_retried(fake: FakeCuration) -> None:
    """gRPC replays only requests that fit its per-call retry buffer (256 KiB by default);
    the client raises it to its largest message, so a call of real images is retried."""
    fake.fail_next = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    with client_for(fake) as client:
        [result] = client.score(make_samples(1, image=b"x" * 600_000))
    assert fake.attempts == 2
    assert result.ok


def test_retries_give_up_after_max_attempts(fake: FakeCuration) -> None:
    fake.fail_next = [grpc.StatusCode.UNAVAILABLE] * 5
    policy = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.05, max_backoff_seconds=0.1)
    with client_for(fake, retry=policy) as client, pytest.raises(grpc.RpcError) as raised:
        client.score(make_samples(1))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fake.attempts == 3


def test_no_retry_when_disabled(fake: FakeCuration) -> None:
    fake.fail_next = [grpc.StatusCode.UNAVAILABLE]
    with client_for(fake, retry=False) as client, pytest.raises(grpc.RpcError):
        client.score(make_samples(1))
    assert fake.attempts == 1


def test_other_errors_raise_without_retry(fake: FakeCuration) -> None:
    fake.fail_next = [grpc.StatusCode.INVALID_ARGUMENT]
    with client_for(fake) as client, pytest.raises(grpc.RpcError) as raised:
        client.score(make_samples(1))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.attempts == 1


@pytest.mark.parametrize("where", ["constructor", "call"])
def test_deadline_exceeded_raises(fake: FakeCuration, where: str) -> None:
    fake.gate = threading.Event()  # never set during the test: the server never answers
    client = client_for(fake, timeout=0.2 if where == "constructor" else 60)
    timeout = 0.2 if where == "call" else None
    with client, pytest.raises(grpc.RpcError) as raised:
        client.score(make_samples(1), timeout=timeout)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_bearer_token_is_sent(fake: FakeCuration) -> None:
    with client_for(fake, token="s3cret") as client:
        client.score(make_samples(1))
        client.server_info()
    assert [m.get("authorization") for m in fake.metadata] == ["Bearer s3cret"] * 2


def test_no_token_no_authorization(fake: FakeCuration) -> None:
    with client_for(fake) as client:
        client.server_info()
    assert "authorization" not in fake.metadata[0]


def test_server_info(fake: FakeCuration) -> None:
    with client_for(fake) as client:
        info = client.server_info()
    assert info.version == "9.9.9"
    assert info.limits.max_samples_per_call == 64


def test_contract_violation_raises_protocol_error(fake: FakeCuration) -> None:
    fake.drop_last_result = True
    with client_for(fake) as client, pytest.raises(ProtocolError, match="expected 2 results"):
        client.score(make_samples(2))


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        CurationClient("127.0.0.1:1", chunk_size=0)
    with pytest.raises(ValueError, match="mTLS"):
        CurationClient("127.0.0.1:1", private_key=b"key")
