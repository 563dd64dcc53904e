"""Input preparation shared by the scoring backends: image mode and the text-length policy."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from align2.server.backends.base import InputTooLong
from align2.server.errors import InvalidArgument


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Centre ``image`` on a square of the processor's mean colour (the method's ``pad``).

    This is LLaVA's ``expand2square`` (``llava/mm_utils.py``, which the reference trained
    and ran with): the whole image stays visible. The colour is ``int(c * 255)`` per
    channel, truncated as the reference does: (122, 116, 104) for CLIP's mean, where
    rounding would give (123, 117, 104). A square image is returned as it is; the square
    keeps the image's mode.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    background = tuple(int(c * 255) for c in mean[:3])
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def text_budget(
    *,
    text_tokens: int,
    image_tokens: int,
    max_text_tokens: int,
    max_length: int,
    model_name: str,
    truncate: bool,
) -> int:
    """How many text tokens to keep (cut from the end); raise InputTooLong when rejecting.

    The text may use at most ``max_text_tokens`` and what ``max_length`` leaves after the
    image tokens; an image that leaves no room at all is InvalidArgument. Image tokens
    come first in every reward template, so cutting from the end never touches them.
    """
    room = max_length - image_tokens
    if room < 1:  # no text at all would fit: truncation cannot help
        raise InvalidArgument(
            f"image: takes {image_tokens} tokens, leaving no room for text in "
            f"models.{model_name}.max_length {max_length}"
        )
    if max_text_tokens <= room:
        limit, desc = max_text_tokens, f"limits.max_text_tokens {max_text_tokens}"
    else:
        limit = room
        desc = (
            f"the {room} tokens that models.{model_name}.max_length {max_length} leaves "
            f"after {image_tokens} image tokens"
        )
    if text_tokens <= limit:
        return text_tokens
    if not truncate:
        raise InputTooLong(text_tokens, desc)
    return limit
