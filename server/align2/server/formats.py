"""Names fixed by the data and checkpoint formats align2 reads and writes, defined once.

Every layer that needs one imports it from here: the method's templates (core), the
tokenizer and checkpoint writers (models), the checkpoint readers and runtimes (backends).
So are the number formats a score is rounded to.
"""

import math
import struct

IMAGE_TOKEN = "<image>"
"""The image marker of LLaVA-format text. The reward templates put it first; a LLaVA
tokenizer keeps it as one token, the place where the image's features go."""

SCORE_KEY = "score.weight"
"""The safetensors key of a reward checkpoint's scalar head, ``[1, text_hidden]``: the
top-level ``score`` module that vLLM's classify adapter loads."""


def as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32, the precision a proto ``float`` carries."""
    return _rounded(value, "<f")


def as_float16(value: float) -> float:
    """``value`` rounded to the nearest IEEE half, as a float16 tensor holds it."""
    return _rounded(value, "<e")


def _rounded(value: float, code: str) -> float:
    """Round half to even; beyond the format's range, infinity (as the format holds it)."""
    try:
        rounded: float = struct.unpack(code, struct.pack(code, value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)
    return rounded
