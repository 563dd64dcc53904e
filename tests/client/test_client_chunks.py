"""How the client cuts samples into calls and which samples it fails itself, unsent."""

from __future__ import annotations

import pathlib

import grpc
from client_fakes import FAST_RETRY, FakeCuration, make_samples

from align2.client import CurationClient, Sample, Turn
from align2.client.calls import DEFAULT_MAX_MESSAGE_BYTES, encode_chunk, sample_chunks

CHUNK_BYTES = DEFAULT_MAX_MESSAGE_BYTES // 2  # a chunk's budget: half the largest message


def test_chunks_hold_at_most_chunk_size_samples_and_about_chunk_bytes(
    tmp_path: pathlib.Path,
) -> None:
    assert [len(c) for c in sample_chunks(make_samples(5), 2)] == [2, 2, 1]
    big = Sample(id="big", image=b"x" * (CHUNK_BYTES // 2), turns=[Turn("Q?", "A.")])
    chunks = sample_chunks([big, big, big, *make_samples(3)], 64)
    assert [len(c) for c in chunks] == [1, 1, 4]  # two halves and their texts do not fit
    on_disk = tmp_path / "big.png"
    on_disk.write_bytes(b"x" * (CHUNK_BYTES // 2))  # a path weighs its file's size, unread
    lazy = Sample(id="lazy", image=on_disk, turns=[Turn("Q?", "A.")])
    assert [len(c) for c in sample_chunks([lazy, lazy], 64)] == [1, 1]


def test_a_sample_that_cannot_be_sent_fails_alone_unsent(fake: FakeCuration) -> None:
    """A text UTF-8 cannot encode (a lone surrogate, valid in JSON) and a sample larger
    than a message are item errors of the client; their chunk-mates are sent."""
    surrogate = Sample(id="s", image=b"png", turns=[Turn("Q?", "A."), Turn("Q?", "a\ud800")])
    huge = Sample(id="h", image=b"x" * DEFAULT_MAX_MESSAGE_BYTES, turns=[Turn("Q?", "A.")])
    encoded = encode_chunk([surrogate, huge])
    assert encoded.sent == []
    text, size = encoded.local_errors
    assert text is not None and text.code == grpc.StatusCode.INVALID_ARGUMENT
    assert text.message.startswith("turns[1].answer: not encodable as UTF-8")
    assert size is not None and "more than one message carries" in size.message
    with CurationClient(fake.target, retry=FAST_RETRY) as client:
        good, bad = client.score([*make_samples(1), surrogate])
    assert good.ok and bad.error is not None and bad.error.message.startswith("turns[1].answer")
    assert fake.attempts == 1  # one call, with the good sample alone


def test_the_clients_own_message_limit_sizes_its_chunks(fake: FakeCuration) -> None:
    """With max_message_bytes 1 MiB a chunk holds about 512 KiB: three 400 KB images go in
    a call each, and a 2 MB one is refused by the client, unsent."""
    images = [Sample(id=str(i), image=b"x" * 400_000, turns=[Turn("Q?", "A.")]) for i in range(3)]
    big = Sample(id="big", image=b"x" * 2_000_000, turns=[Turn("Q?", "A.")])
    with CurationClient(fake.target, retry=FAST_RETRY, max_message_bytes=1 << 20) as client:
        results = client.score([*images, big])
    assert [len(r.samples) for r in fake.requests] == [1, 1, 1]
    assert [r.ok for r in results] == [True, True, True, False]
    assert "max_message_bytes 1048576" in (results[3].error.message if results[3].error else "")
