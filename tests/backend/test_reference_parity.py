"""Pixel- and token-level parity with the reference code.

Align2LLaVA's reward models were trained and run with LLaVA's ``llava/mm_utils.py``. The
functions that shape a reward input are re-implemented here from the reference's text,
independently of align2:

- ``expand2square``: a square of ``tuple(int(x * 255) for x in image_mean)`` (truncated),
  the image pasted at ``(0, (width - height) // 2)`` or ``((height - width) // 2, 0)``, a
  square image returned as it is.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN

from align2.server.backends.preprocess import pad_to_square


# -- the reference, re-implemented from llava/mm_utils.py ---------------------------------
def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


# -- pixels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(7, 3), (3, 7), (5, 5), (1, 9), (9, 1), (2, 7), (8, 3)])
def test_pad_to_square_equals_expand2square_pixel_for_pixel(size: tuple[int, int]) -> None:
    image = Image.effect_noise(size, 80).convert("RGB")
    theirs = expand2square(image, tuple(int(x * 255) for x in OPENAI_CLIP_MEAN))
    ours = pad_to_square(image, OPENAI_CLIP_MEAN)
    assert ours.size == theirs.size and ours.mode == theirs.mode
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    if size[0] == size[1]:
        assert ours is image  # returned as is, as the reference does


def test_pad_colour_truncates_like_the_reference() -> None:
    corner = pad_to_square(Image.new("RGB", (4, 2), (0, 0, 0)), OPENAI_CLIP_MEAN).getpixel((0, 0))
    assert corner == (122, 116, 104)  # int(); rounding would give (123, 117, 104)
    grey = pad_to_square(Image.new("RGB", (4, 2)), (0.5, 0.5, 0.5)).getpixel((0, 0))
    assert grey == (127, 127, 127)  # SmolVLM's mean 0.5: int(127.5)
