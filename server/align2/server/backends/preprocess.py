"""Input preparation shared by the scoring backends: image mode, reward token ids and the
text-length policy.

The image padding and the token ids follow the reference code (LLaVA's ``llava/mm_utils.py``,
which Align2LLaVA's reward models were trained and run with) exactly: ``expand2square``
and ``tokenizer_image_token``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from PIL import Image

from align2.server.backends.base import InputTooLong
from align2.server.errors import InvalidArgument
from align2.server.formats import IMAGE_TOKEN

IMAGE_BACKEND = "pil"
"""The image processor's backend, pinned: transformers picks ``torchvision`` whenever it is
installed (the CUDA image has it), whose resize gives other pixels than the PIL resize the
reference's CLIPImageProcessor used, so scores near a cut could change sides by host."""


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Centre ``image`` on a square of the processor's mean colour (the method's ``pad``).

    This is LLaVA's ``expand2square`` (``llava/mm_utils.py``, which the reference trained
    and ran with): the whole image stays visible. The colour is ``int(c * 255)`` per
    channel, truncated as the reference does: (122, 116, 104) for CLIP's mean, where
    rounding would give (123, 117, 104). A square image is returned as it is; the square
    keeps the image's mode.

    The square is kept with ``image`` (on the object, for this colour) and returned again:
    a sample's forward passes (its question and every turn) pad once, and a vLLM prompt,
    which holds its image until its batch runs, does not hold a copy of its own (64 turns
    of a 40 Mpx image were 64 copies of 120 MB). It lives as long as the image does.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    background = tuple(int(c * 255) for c in mean[:3])
    with _lock_of(image):  # a sample's items are prepared at once, in several threads
        kept = getattr(image, _PADDED, None)
        if kept is not None and kept[0] == background:
            return kept[1]
        square = Image.new(image.mode, (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        setattr(image, _PADDED, (background, square))
        return square


_PADDED = "_align2_padded"
_LOCK = "_align2_pad_lock"
_LOCKS = threading.Lock()


def _lock_of(image: Image.Image) -> threading.Lock:
    """The image's own lock (made once): its padding is made once, not once per thread."""
    with _LOCKS:
        lock = getattr(image, _LOCK, None)
        if lock is None:
            lock = threading.Lock()
            setattr(image, _LOCK, lock)
        return lock


def reward_ids(tokenizer: Any, text: str, image_ids: Sequence[int]) -> list[int]:
    """Token ids of a reward template, as LLaVA's ``tokenizer_image_token`` builds them,
    with the ``<image>`` marker replaced by ``image_ids`` (its expansion, or the marker id
    where the engine expands it).

    The text is split on the marker and each part is tokenised alone, with the tokenizer's
    special tokens; when the first part starts with BOS, BOS is kept once and dropped from
    the part after the image. So that part starts as a fresh text: a SentencePiece
    tokenizer gives it its dummy-prefix piece, as in the reference's
    ``[BOS, IMAGE, "▁", "<0x0A>", ...]`` for ``"<image>\\n..."``, which tokenising the
    whole text at once keeps or drops depending on the tokenizer's settings (transformers'
    Llama ``legacy``). A byte-level BPE (SmolVLM's) gives the same ids either way.
    Raises ValueError unless ``text`` holds exactly one marker.
    """
    return reward_ids_and_image_end(tokenizer, text, image_ids)[0]


def reward_ids_and_image_end(
    tokenizer: Any, text: str, image_ids: Sequence[int]
) -> tuple[list[int], int]:
    """:func:`reward_ids`, and the index after ``image_ids`` in them (where the image ends:
    what a shared prefix must cover, backends/prefixes.py)."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) != 2:
        raise ValueError(
            f"a reward text holds exactly one {IMAGE_TOKEN} marker; this one has {len(parts) - 1}"
        )
    before, after = (list(tokenizer(part)["input_ids"]) for part in parts)
    bos = tokenizer.bos_token_id
    skip = 1 if bos is not None and before[:1] == [bos] else 0
    return [*before, *image_ids, *after[skip:]], len(before) + len(image_ids)


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
