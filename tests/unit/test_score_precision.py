"""A float16 model's scores are float16 numbers, as the reference's float16 model returns
them (its scalar head runs in float16: eval.py writes ``logits.tolist()``), so ties, and
the input order that breaks them, match its selection (core/runtime.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from align2.server.backends.base import ModelDescription, Prepared
from align2.server.config import BatchingConfig
from align2.server.core.runtime import ScoringRuntime

RAW = [0.1, 1.2345678, -3.14159265, 1e-9, 65519.0, 1e6, -1e6]


class PayloadBackend:
    """Scores each input with its payload, in the given dtype."""

    def __init__(self, dtype: str) -> None:
        self.description = ModelDescription(
            name="m", model_id="fake", revision="", backend="fake", family="llava",
            dtype=dtype, device="cpu", max_length=64, image_tokens=1, image_mode="pad",
        )  # fmt: skip

    def prepare(self, text: str, image: object, *, max_text_tokens: int, truncate: bool) -> None:
        raise NotImplementedError

    async def score(self, batch: Sequence[Prepared]) -> list[float]:
        return [p.payload for p in batch]

    def close(self) -> None:
        pass


async def served(dtype: str) -> list[float]:
    runtime = ScoringRuntime(PayloadBackend(dtype), BatchingConfig())  # type: ignore[arg-type]
    return await runtime._score([Prepared(1, False, value) for value in RAW])


async def test_float16_scores_are_what_a_float16_tensor_holds() -> None:
    """Independent: numpy's float16 (IEEE half, round to nearest even; out of range: inf)."""
    with np.errstate(over="ignore"):
        expected = [float(np.float16(value)) for value in RAW]
    assert await served("float16") == expected
    assert expected[0] == 0.0999755859375 and math.isinf(expected[-2])
    assert expected[4] == 65504.0  # the largest half below the overflow threshold


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_other_dtypes_keep_the_float32_head_score(dtype: str) -> None:
    assert await served(dtype) == RAW
