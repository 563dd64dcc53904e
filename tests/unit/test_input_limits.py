"""A sample's structural checks (core/validation.py) and image checks (core/images.py):
limits are inclusive, and each refusal names its field."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from align2.client.types import Sample, Turn
from align2.server.core.images import decode_image, open_image
from align2.server.core.validation import check_turns
from align2.server.errors import InvalidArgument

ALIGN = "answers are rewritten"  # an answers_needed reason, as Align gives one


def problem(*turns: Turn, answers_needed: str | None = None, **limits: int) -> str | None:
    settings = {"max_turns": 8, "max_candidates": 4, "max_text_bytes": 1000} | limits
    found = check_turns(
        Sample(id="s", image=b"", turns=list(turns)),
        settings["max_turns"],
        answers_needed=answers_needed,
        max_candidates=settings["max_candidates"],
        max_text_bytes=settings["max_text_bytes"],
    )
    return None if found is None else found.message


# ---------------------------------------------------------------------------------------
# validation.py


def test_exactly_max_turns_is_accepted() -> None:
    """Fails on: ``>=`` for ``>`` in the turn-count check."""
    assert problem(Turn("a?", "b"), Turn("c?", "d"), max_turns=2) is None
    assert problem(Turn("a?", "b"), Turn("c?", "d"), Turn("e?", "f"), max_turns=2) == (
        "turns: 3 turns exceeds limits.max_turns 2"
    )


def test_a_text_of_exactly_max_text_bytes_is_accepted() -> None:
    """Five two-byte characters with max_text_bytes 10: allowed. Fails on: ``>=``."""
    assert problem(Turn("q?", "é" * 5), max_text_bytes=10) is None
    assert "11 bytes (UTF-8) exceeds" in (
        problem(Turn("q?", "é" * 5 + "x"), max_text_bytes=10) or ""
    )


def test_an_answer_blank_once_cleaned_is_refused_where_answers_are_needed() -> None:
    """ " <image> " is no answer to rewrite. Fails on: ``not turn.answer`` for the cleaned."""
    assert problem(Turn("q?", " <image> "), answers_needed=ALIGN) == (
        f"turns[0].answer: empty, and {ALIGN}"
    )


def test_a_blank_candidate_is_refused_where_answers_are_needed() -> None:
    """Fails on: ``not candidate`` for ``not clean(candidate)``."""
    assert problem(Turn("q?", candidates=("ok", "  ")), answers_needed=ALIGN) == (
        f"turns[0].answer_candidates[1]: empty, and {ALIGN}"
    )


# ---------------------------------------------------------------------------------------
# images.py


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_exactly_max_pixels_is_accepted() -> None:
    """Fails on: ``>=`` for ``>`` on width x height."""
    assert open_image(png((10, 10)), max_bytes=10_000, max_pixels=100).size == (10, 10)


def test_exactly_max_bytes_is_accepted() -> None:
    """Fails on: ``>=`` for ``>`` on the byte size."""
    data = png((10, 10))
    assert open_image(data, max_bytes=len(data), max_pixels=100).size == (10, 10)
    with pytest.raises(InvalidArgument, match=rf"{len(data)} bytes exceeds"):
        open_image(data, max_bytes=len(data) - 1, max_pixels=100)


def test_a_padded_square_of_exactly_max_pixels_is_accepted() -> None:
    """Fails on: ``>=`` for ``>`` on the padded square."""
    assert decode_image(png((10, 4)), max_bytes=10_000, max_pixels=100, padded=True).size == (10, 4)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_every_image_is_decoded_as_rgb(mode: str) -> None:
    """The vision tower takes three channels. Fails on: returning the image unconverted."""
    assert decode_image(png((8, 8), mode), max_bytes=10_000, max_pixels=100).mode == "RGB"
