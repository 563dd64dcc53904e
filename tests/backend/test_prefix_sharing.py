"""Shared prefixes under the answer head: the turns of a conversation and the candidates of a
turn run their common prefix (BOS, the image, the template's start) once.

Scores with sharing equal each input run whole and alone, within fp32 rounding, on tiny
real models of both families and on the shared-base path of the paper's adapters, where
they are also checked against the independent reference (peft, unmerged). So do the scores
of length-aware batches: a batch of very different lengths run as several forwards.
"""

from __future__ import annotations

import asyncio
import io
import pathlib

import pytest
from lora_reference import REL, OriginalSet, Reference, answer_text
from PIL import Image

from align2.server.backends import load_shared_scoring
from align2.server.backends.base import Prepared
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import ModelConfig

SHORT = "<image>\nWhat is it?"
LONG = "<image>\n" + " ".join(f"Question {i}: what else is on the left?" for i in range(12))
QUESTIONS = ["<image>\nWhat is on the table?", "Why is it there?", "What colour is it?", "Who?"]
CANDIDATES = ["A cup.", "It is a red cup with a chipped handle.", "A plate of toast and jam."]


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    buffer = io.BytesIO()
    Image.effect_noise(size, 30 + seed).convert("RGB").save(buffer, format="PNG")
    return Image.open(buffer).convert("RGB")


def answer_batch() -> list[tuple[str, Image.Image]]:
    """A 4-turn conversation with 3 candidates a turn (one image), two turns on a second
    image, one turn on a third: 15 answer-head inputs in one batch."""
    first, second, third = picture(0), picture(1, (30, 44)), picture(2)
    out = [(answer_text(q, a), first) for q in QUESTIONS for a in CANDIDATES]
    out += [(answer_text(q, "Yes."), second) for q in QUESTIONS[:2]]
    out.append((answer_text(QUESTIONS[0], "Nothing at all."), third))
    return out


def prepare(backend: TransformersScoring, batch: list[tuple[str, Image.Image]]) -> list[Prepared]:
    return [backend.prepare(t, i, max_text_tokens=2048, truncate=False) for t, i in batch]


def score(backend: TransformersScoring, prepared: list[Prepared]) -> list[float]:
    return asyncio.run(backend.score(prepared))


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_idefics3"])
def test_a_shared_batch_scores_as_each_input_whole_and_alone(
    request: pytest.FixtureRequest, family: str
) -> None:
    folder: pathlib.Path = request.getfixturevalue(family)
    sharing = TransformersScoring.load("a", ModelConfig(path=str(folder)), folder)
    whole = TransformersScoring.load(
        "a", ModelConfig(path=str(folder), share_prefixes=False), folder
    )
    batch = answer_batch()
    alone = [score(whole, prepare(whole, [x]))[0] for x in batch]
    together = score(sharing, prepare(sharing, batch))
    assert together == pytest.approx(alone, rel=1e-5, abs=1e-5)
    # Run once, not 15 times: the first image's prefix is repeated over 12 inputs, the
    # second's over 2; the third image's input runs whole.
    assert sharing.prefix_tokens_saved > 0
    assert score(whole, prepare(whole, batch)) == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert whole.prefix_tokens_saved == 0


def test_a_prefix_is_not_shared_across_images(tiny_llava: pathlib.Path) -> None:
    backend = TransformersScoring.load("a", ModelConfig(path=str(tiny_llava)), tiny_llava)
    text = answer_text(QUESTIONS[0], CANDIDATES[0])
    same_text = [(text, picture(i)) for i in range(4)]  # the same ids but four images
    scores = score(backend, prepare(backend, same_text))
    assert backend.prefix_tokens_saved == 0
    assert len(set(scores)) == 4


def test_the_shared_base_shares_prefixes_as_the_reference_scores(
    original_llava: OriginalSet,
) -> None:
    o = original_llava
    models = {
        name: ModelConfig(
            path=str(o.base),
            adapter=str(adapter),
            vision_tower=str(o.clip),
            image_mode="square",  # what the reference computes (its CLIP processor alone)
            share_base=True,
        )
        for name, adapter in (("question", o.question), ("answer", o.answer))
    }
    heads = load_shared_scoring(models, o.base.parent)
    answer = heads["answer"]
    batch = answer_batch()
    scores = score(answer, prepare(answer, batch))
    assert answer.prefix_tokens_saved > 0
    reference = Reference(o.base, o.clip, o.answer)
    for (text, image), got in zip(batch, scores, strict=True):
        assert got == pytest.approx(reference.score(text, image), rel=REL, abs=1e-5)
    for head in heads.values():
        head.close()


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_idefics3"])
def test_a_split_batch_scores_as_each_input_alone(
    request: pytest.FixtureRequest, family: str
) -> None:
    folder: pathlib.Path = request.getfixturevalue(family)
    split = TransformersScoring.load(
        "q", ModelConfig(path=str(folder), length_split_tokens=1), folder
    )
    whole = TransformersScoring.load(
        "q", ModelConfig(path=str(folder), length_split_tokens=0), folder
    )
    # Six short inputs and two long ones, each on its own image, interleaved.
    texts = [SHORT, SHORT, LONG, SHORT, SHORT, LONG, SHORT, SHORT]
    batch = [
        split.prepare(text, picture(10 + i, (36, 28)), max_text_tokens=2048, truncate=False)
        for i, text in enumerate(texts)
    ]
    lengths = [p.tokens for p in batch]
    assert max(lengths) > min(lengths) + 50  # a real spread to split

    got = score(split, batch)
    assert split.padded_tokens_saved > 0  # it did split
    assert score(whole, batch) == pytest.approx(got, rel=1e-5, abs=1e-5)
    assert whole.padded_tokens_saved == 0
    alone = [score(whole, [p])[0] for p in batch]
    assert got == pytest.approx(alone, rel=1e-5, abs=1e-5)  # in the batch's order
    split.close()
    whole.close()
