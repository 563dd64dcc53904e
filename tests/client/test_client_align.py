"""The client side of Align: options, request building, and rebuilding each sample as kept."""

from __future__ import annotations

import pathlib

import grpc
import pytest

from align2.client import ImageMarker, ProtocolError, Sample, TokenCounts, Turn
from align2.client.calls import AlignCall, align_options
from align2.v1 import curation_pb2 as pb


def sample(i: int, turns: int = 2) -> Sample:
    return Sample(
        id=f"s{i}",
        image=b"png",
        turns=[Turn(f"Q{j}?", f"A{j}.") for j in range(turns)],
        task="conversation",
        image_marker=ImageMarker.END,
        image_file=f"{i}.png",
        extra={"source": "coco"},
    )


def aligned(original: Turn, kept: int, reason: str = "review") -> pb.AlignedTurn:
    rewrite = pb.Turn(question=original.question + " (r)", answer=original.answer + " (r)")
    return pb.AlignedTurn(
        original=pb.Turn(question=original.question, answer=original.answer),
        rewrite=rewrite,
        kept=kept,
        reason=reason,
        margin=0.25 if reason == "review" else None,
    )


def response(samples: list[Sample], kept: int = pb.KEPT_REWRITE) -> pb.AlignResponse:
    results = [pb.AlignResult(id=s.id, turns=[aligned(t, kept) for t in s.turns]) for s in samples]
    return pb.AlignResponse(
        results=results,
        model=pb.ModelRef(name="llm", model_id="smol", revision="r1", backend="transformers"),
        template=pb.TemplateRef(name="default-v1", sha256="ab" * 32),
        tokens=pb.TokenCounts(prompt_tokens=100, generated_tokens=20),
        timing=pb.Timing(queue_seconds=0.5, compute_seconds=1.5),
    )


def test_options_are_validated_and_unset_ones_left_to_the_server() -> None:
    options = align_options()
    assert options.parts == pb.REWRITE_PARTS_BOTH and options.review
    assert not options.decoding.HasField("max_new_tokens") and not options.template
    options = align_options(parts="answers", review=False, max_new_tokens=8, seed=0, top_p=0.5)
    assert options.parts == pb.REWRITE_PARTS_ANSWERS and not options.review
    assert (options.decoding.max_new_tokens, options.decoding.seed) == (8, 0)
    for bad, match in [
        ({"parts": "all"}, r"valid are \['answers', 'both', 'questions'\]"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            align_options(**bad)  # type: ignore[arg-type]


def test_samples_are_rebuilt_as_kept(tmp_path: pathlib.Path) -> None:
    samples = [sample(0), sample(1, turns=1)]
    samples.append(Sample(id="gone", image=tmp_path / "missing.png", turns=[Turn("Q?", "A.")]))
    call = AlignCall.plan(samples, chunk_size=8, priority="interactive", parts="questions")
    chunk = call.encode(0)
    assert chunk.request is not None and [s.id for s in chunk.request.samples] == ["s0", "s1"]
    assert chunk.request.priority == pb.PRIORITY_INTERACTIVE
    assert chunk.request.options.parts == pb.REWRITE_PARTS_QUESTIONS
    reply = call.reply([call.decode(chunk, response(samples[:2]))])
    first, second, gone = reply.results
    assert first.ok and first.sample is not None
    assert first.sample.turns == [Turn("Q0? (r)", "A0. (r)"), Turn("Q1? (r)", "A1. (r)")]
    assert first.sample.turns == [t.turn for t in first.turns]
    kept = first.sample
    assert (kept.image, kept.image_marker, kept.image_file, kept.extra, kept.task) == (
        b"png",
        ImageMarker.END,
        "0.png",
        {"source": "coco"},
        "conversation",
    )
    assert first.turns[0].margin == 0.25 and first.turns[0].kept == "rewrite"
    assert second.sample is not None and len(second.turns) == 1
    assert gone.error is not None and gone.error.code == grpc.StatusCode.NOT_FOUND
    assert gone.sample is None and gone.turns == ()
    assert reply.model is not None and reply.model.model_id == "smol"
    assert reply.template is not None and reply.template.name == "default-v1"
    assert reply.tokens == TokenCounts(100, 20) and reply.timing.compute_seconds == 1.5


def test_kept_original_errors_and_unknown_kept() -> None:
    samples = [sample(0, turns=1), sample(1, turns=1)]
    message = response(samples, kept=pb.KEPT_ORIGINAL)
    message.results[1].CopyFrom(
        pb.AlignResult(id="s1", error=pb.ItemError(code=3, message="samples[1].turns: empty"))
    )
    call = AlignCall.plan(samples, chunk_size=8)
    first, second = call.decode(call.encode(0), message).results
    assert first.sample is not None and first.sample.turns == samples[0].turns
    assert second.error is not None and second.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert second.sample is None
    newer = response(samples[:1])
    newer.results[0].turns[0].kept = 7  # a Kept value from a newer server
    one = AlignCall.plan(samples[:1], chunk_size=8)
    [result] = one.decode(one.encode(0), newer).results
    assert result.turns[0].kept == "original"  # never a rewrite the server did not keep


def test_contract_breaks_raise_protocol_error() -> None:
    samples = [sample(0)]
    call = AlignCall.plan(samples, chunk_size=8)
    chunk = call.encode(0)
    wrong_count = response(samples)
    del wrong_count.results[0].turns[1]
    with pytest.raises(ProtocolError, match="1 aligned turns for 2"):
        call.decode(chunk, wrong_count)
    wrong_id = response(samples)
    wrong_id.results[0].id = "other"
    with pytest.raises(ProtocolError):
        call.decode(chunk, wrong_id)
