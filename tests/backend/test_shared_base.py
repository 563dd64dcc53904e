"""One base in memory for both reward heads (``share_base``), against the merged copies.

The tiny release-format inputs (conftest ``original_llava``: two adapters that differ in
rank, scaling rule and weight format) are served both ways: converted into two merged
checkpoints, and as one shared base with each adapter, projector and head applied per
batch. The scores must agree within fp32 rounding, whatever the batch and whatever the
other head does at the same time; the vision tower must run once per image; and the shared
model must hold the base once.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from lora_reference import (
    REL,
    OriginalSet,
    Reference,
    answer_text,
    assert_matches_reference,
    image_of,
    question_text,
    samples,
)

from align2.client.types import Sample
from align2.server.backends import load_shared_scoring
from align2.server.backends.base import Prepared, ScoringBackend
from align2.server.backends.shared_scoring import SharedBase, SharedHeadScoring
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import BatchingConfig, LimitsConfig, ModelConfig, ScoreConfig
from align2.server.core.runtime import ScoringRuntime
from align2.server.core.scoring import SampleScore, ScoreCall, Scorer
from align2.server.errors import ConfigError
from align2.server.models.llava_original import read_adapter


def shared_heads(o: OriginalSet, image_mode: str = "square") -> dict[str, SharedHeadScoring]:
    models = {
        name: ModelConfig(
            path=str(o.base),
            adapter=str(adapter),
            vision_tower=str(o.clip),
            image_mode=image_mode,
            share_base=True,
        )
        for name, adapter in (("question", o.question), ("answer", o.answer))
    }
    backends = load_shared_scoring(models, o.base.parent)
    assert all(isinstance(b, SharedHeadScoring) for b in backends.values())
    return backends


def merged_heads(
    converted: tuple[pathlib.Path, pathlib.Path],
    image_mode: str = "square",
    share_prefixes: bool = True,
) -> dict[str, TransformersScoring]:
    def load(folder: pathlib.Path) -> TransformersScoring:
        config = ModelConfig(path=str(folder), image_mode=image_mode, share_prefixes=share_prefixes)
        return TransformersScoring.load(folder.name, config, folder)

    return {"question": load(converted[0]), "answer": load(converted[1])}


def base_of(heads: dict[str, SharedHeadScoring]) -> SharedBase:
    bases = {id(h._shared): h._shared for h in heads.values()}
    assert len(bases) == 1, "both heads must be over one base"
    return next(iter(bases.values()))


def score_call(backends: dict[str, ScoringBackend], batch: list[Sample]) -> list[SampleScore]:
    """One Score call with both heads through the core (a batcher per head, as served)."""

    async def run() -> list[SampleScore]:
        runtimes = {n: ScoringRuntime(b, BatchingConfig()) for n, b in backends.items()}
        for runtime in runtimes.values():
            runtime.start()
        try:
            with ThreadPoolExecutor(2) as pool:
                scorer = Scorer(runtimes, ScoreConfig(), LimitsConfig(), pool)
                return (await scorer.score(ScoreCall(samples=batch))).results
        finally:
            for runtime in runtimes.values():
                await runtime.batcher.close()

    return asyncio.run(run())


def assert_same_scores(got: list[SampleScore], want: list[SampleScore]) -> None:
    for mine, theirs in zip(got, want, strict=True):
        assert mine.error is None and theirs.error is None
        assert mine.question_score == pytest.approx(theirs.question_score, rel=REL, abs=1e-5)
        assert mine.answer_scores == pytest.approx(theirs.answer_scores, rel=REL, abs=1e-5)


@pytest.mark.parametrize("image_mode", ["square", "pad"])
def test_shared_base_scores_as_the_merged_checkpoints(
    original_llava: OriginalSet, converted: tuple[pathlib.Path, pathlib.Path], image_mode: str
) -> None:
    batch = samples()
    shared = score_call(dict(shared_heads(original_llava, image_mode)), batch)
    merged = score_call(dict(merged_heads(converted, image_mode)), batch)
    assert_same_scores(shared, merged)
    if image_mode == "square":  # what the reference computes (its CLIP processor alone)
        o = original_llava
        refs = (Reference(o.base, o.clip, o.question), Reference(o.base, o.clip, o.answer))
        assert_matches_reference(shared, refs, batch)


def test_a_batch_scores_as_each_input_alone_while_the_other_head_runs(
    original_llava: OriginalSet,
) -> None:
    """Mixed lengths and images in one batch; both heads' batches submitted at once, many
    times over (each batch must see its own adapter, projector and head throughout)."""
    heads = shared_heads(original_llava)
    batch = samples()
    inputs: dict[str, list[Prepared]] = {"question": [], "answer": []}
    for sample in batch:
        image = image_of(sample)
        texts = {
            "question": [question_text([t.question for t in sample.turns])],
            "answer": [answer_text(t.question, t.answer) for t in sample.turns],
        }
        for head, items in texts.items():
            inputs[head] += [
                heads[head].prepare(text, image, max_text_tokens=2048, truncate=False)
                for text in items
            ]

    async def run() -> tuple[dict[str, list[float]], list[dict[str, list[float]]]]:
        alone = {
            head: [(await heads[head].score([p]))[0] for p in items]
            for head, items in inputs.items()
        }
        together = []
        for _ in range(4):
            q, a = await asyncio.gather(
                heads["question"].score(inputs["question"]), heads["answer"].score(inputs["answer"])
            )
            together.append({"question": q, "answer": a})
        return alone, together

    alone, together = asyncio.run(run())
    assert len(inputs["answer"]) > len(inputs["question"]) > 1
    for scores in together:
        for head in inputs:
            assert scores[head] == pytest.approx(alone[head], rel=REL, abs=1e-5)
    # The heads are different models: not one adapter applied twice.
    assert alone["question"][0] != pytest.approx(alone["answer"][0], rel=1e-3)


class TowerCounter:
    """Counts the images that go through vision towers (a forward hook on each)."""

    def __init__(self, towers: Iterable[torch.nn.Module]) -> None:
        self.images = 0
        self._handles = [t.register_forward_hook(self._hook) for t in towers]

    def _hook(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: object
    ) -> None:
        self.images += args[0].shape[0]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def test_the_vision_tower_runs_once_per_image_for_both_heads(
    original_llava: OriginalSet, converted: tuple[pathlib.Path, pathlib.Path]
) -> None:
    batch = samples()  # 3 images; 3 question inputs + 1 + 2 + 3 answer inputs
    inputs = len(batch) + sum(len(s.turns) for s in batch)
    heads = shared_heads(original_llava)
    base = base_of(heads)
    counter = TowerCounter([base.model.vision_tower])
    score_call(dict(heads), batch)
    assert counter.images == base.tower_images == len(batch) < inputs
    # Scored again (another call): every image's features are still cached.
    score_call(dict(heads), batch)
    assert counter.images == len(batch)
    counter.close()
    # The merged copies run their towers once per input (prefixes not shared: with them,
    # once per image and head within a batch, which depends on how batches form).
    merged = merged_heads(converted, share_prefixes=False)
    counter = TowerCounter(m._base.vision_tower for m in merged.values())
    score_call(dict(merged), batch)
    assert counter.images == inputs
    counter.close()


def test_a_full_cache_only_recomputes(original_llava: OriginalSet) -> None:
    """With room for one image's features, scores are the same; the tower runs more."""
    heads = shared_heads(original_llava)
    batch = samples()
    roomy = score_call(dict(heads), batch)
    base = base_of(heads)
    base._cache.clear()
    base._cache_images = 1
    before = base.tower_images
    tight = score_call(dict(heads), batch)
    assert_same_scores(tight, roomy)
    assert base.tower_images - before >= len(batch)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor held twice counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *(b for b in module.buffers() if b is not None)]


def test_the_shared_model_holds_one_base_and_each_head_s_adapter(
    original_llava: OriginalSet, converted: tuple[pathlib.Path, pathlib.Path]
) -> None:
    heads = shared_heads(original_llava)
    base = base_of(heads)
    shared = storage_bytes(
        [
            *module_tensors(base.model),
            *(t for p in base.projectors.values() for t in module_tensors(p)),
            *(h._head for h in heads.values()),
        ]
    )
    merged = merged_heads(converted)
    one_copy = storage_bytes([*module_tensors(merged["question"]._base), merged["question"]._head])
    projector = storage_bytes(module_tensors(merged["question"]._base.multi_modal_projector))
    head = merged["question"]._head.nbytes
    lora = {
        name: sum(t.nbytes for n, t in base.model.named_parameters() if f".{h.adapter_name}." in n)
        for name, h in base.heads.items()
    }
    # Exactly: the base without projector and head, plus per head its LoRA A and B, its
    # projector and its head (the merged copy holds one of each, merged).
    assert shared == one_copy - projector - head + sum(lora[n] + projector + head for n in heads)
    # Each LoRA is what its adapter file holds (fp32 here): A [r, in] and B [out, r].
    o = original_llava
    for name, folder in (("question", o.question), ("answer", o.answer)):
        pairs = read_adapter(folder).lora.values()
        assert lora[name] == sum(4 * (a.numel() + b.numel()) for a, b in pairs) > 0
    # Every base weight is stored once, not once per head.
    pointers = [p.data_ptr() for p in base.model.parameters()]
    assert len(pointers) == len(set(pointers))
    assert shared < 2 * one_copy


def test_the_heads_release_the_base_when_the_last_one_closes(
    original_llava: OriginalSet,
) -> None:
    heads = shared_heads(original_llava)
    base = base_of(heads)
    heads["question"].close()
    prepared = heads["answer"].prepare(
        question_text(["What is it?"]), image_of(samples()[0]), max_text_tokens=2048, truncate=False
    )
    assert len(asyncio.run(heads["answer"].score([prepared]))) == 1  # still serving
    heads["answer"].close()
    assert not hasattr(base, "model")
    with pytest.raises(RuntimeError):
        base.executor.submit(lambda: None)


def test_adapters_that_describe_different_models_cannot_share_a_base(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    o = original_llava
    other = tmp_path / "lora-other-layer"
    shutil.copytree(o.answer, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"mm_vision_select_layer": -1}))
    models = {
        name: ModelConfig(
            path=str(o.base), adapter=str(adapter), vision_tower=str(o.clip), share_base=True
        )
        for name, adapter in (("question", o.question), ("answer", other))
    }
    with pytest.raises(ConfigError, match=r"share_base: .*vision_feature_layer"):
        load_shared_scoring(models, tmp_path)
    models["answer"].adapter = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"models\.answer\.adapter: adapter .* not a folder"):
        load_shared_scoring(models, tmp_path)
