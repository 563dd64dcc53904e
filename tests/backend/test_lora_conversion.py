"""The paper's release format (original-LLaVA base + PEFT LoRA reward adapters), converted.

The tiny inputs are written in the release's layout with peft itself (conftest
``original_llava``). Scores of the converted checkpoints, run by align2's transformers
backend, are checked against tests/lora_reference.py: the reference computation with the
adapter applied UNMERGED by peft, written without the converter. Then every refusal, and
that a refused or failed conversion leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from lora_reference import (
    OriginalSet,
    Reference,
    answer_text,
    assert_matches_reference,
    image_of,
    question_text,
    samples,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlamaTokenizer

from align2.client.types import Sample
from align2.server import cli
from align2.server.backends.checkpoint import read_reward_checkpoint
from align2.server.backends.transformers_scoring import TransformersScoring
from align2.server.config import BatchingConfig, LimitsConfig, ModelConfig, ScoreConfig
from align2.server.core.runtime import ScoringRuntime
from align2.server.core.scoring import ScoreCall, Scorer
from align2.server.models import original_builders as ob
from align2.server.models.convert_reward import (
    PROVENANCE,
    ConversionError,
    convert_reward,
    ensure_converted,
)
from align2.server.models.llava_tokenizer import splits_like_llava


def score_all(question: TransformersScoring, answer: TransformersScoring, batch: list[Sample]):
    async def run():
        runtimes = {"q": ScoringRuntime(question, BatchingConfig())}
        runtimes["a"] = ScoringRuntime(answer, BatchingConfig())
        for runtime in runtimes.values():
            runtime.batcher.start()
        with ThreadPoolExecutor(2) as pool:
            scorer = Scorer(
                runtimes, ScoreConfig(question_model="q", answer_model="a"), LimitsConfig(), pool
            )
            outcome = await scorer.score(ScoreCall(samples=batch))
        for runtime in runtimes.values():
            await runtime.batcher.close()
        return outcome.results

    return asyncio.run(run())


@pytest.fixture(scope="module")
def references(original_llava: OriginalSet) -> tuple[Reference, Reference]:
    refs = (
        Reference(original_llava.base, original_llava.clip, original_llava.question),
        Reference(original_llava.base, original_llava.clip, original_llava.answer),
    )
    assert not any(r.merged_any() for r in refs)
    return refs


def load(folder: pathlib.Path) -> TransformersScoring:
    config = ModelConfig(path=str(folder), image_mode="square")
    return TransformersScoring.load(folder.name, config, folder)


def test_converted_checkpoints_score_as_the_reference_computes(
    converted: tuple[pathlib.Path, pathlib.Path], references: tuple[Reference, Reference]
) -> None:
    batch = samples()
    results = score_all(load(converted[0]), load(converted[1]), batch)
    assert_matches_reference(results, references, batch)
    # The two heads are different models: the same text scores differently.
    text, image = answer_text("Why?", "Because."), image_of(batch[0])
    assert references[0].score(text, image) != pytest.approx(references[1].score(text, image))


def test_lora_changes_the_score(
    original_llava: OriginalSet, references: tuple[Reference, Reference]
) -> None:
    """The merged deltas matter: zeroing peft's scaling changes the reference's score, so the
    equality above could not hold with the LoRA dropped."""
    ref = references[0]
    text, image = question_text(["What is this?"]), Image.new("RGB", (40, 40), (10, 200, 30))
    with_lora = ref.score(text, image)
    with ref.peft.disable_adapter():  # base weights, the trained projector and head kept
        without = ref.score(text, image)
    assert abs(with_lora - without) > 1e-3 * max(1.0, abs(with_lora))


def test_converted_folder_layout_and_provenance(
    converted: tuple[pathlib.Path, pathlib.Path], original_llava: OriginalSet
) -> None:
    folder = converted[1]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and len(config["id2label"]) == 1  # num_labels 1
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    checkpoint = read_reward_checkpoint(folder)
    assert tuple(checkpoint.score_weight.shape) == (1, 64)
    head = torch.load(original_llava.answer / "adapter_model.bin", weights_only=True)
    assert torch.equal(checkpoint.score_weight, head["base_model.model.score.weight"])
    provenance = json.loads((folder / PROVENANCE).read_text())
    assert provenance["align2_version"]
    assert provenance["score_head_from"] == "adapter_model.bin:base_model.model.score.weight"
    assert provenance["lora"] == {
        "r": 4,
        "lora_alpha": 32,
        "use_rslora": True,
        "scaling": 16.0,  # alpha / sqrt(r)
        "modules_merged": 14,  # 7 linear layers x 2 decoder layers
    }
    inputs = provenance["inputs"]
    assert inputs["base"]["folder"] == "llava-base"
    assert set(inputs["adapter"]["files"]) == {
        "adapter_config.json",
        "adapter_model.bin",
        "config.json",
        "non_lora_trainables.bin",
    }
    digest = hashlib.sha256((original_llava.clip / "model.safetensors").read_bytes()).hexdigest()
    assert inputs["vision_tower"]["files"]["model.safetensors"] == digest
    assert str(original_llava.base.parent) not in json.dumps(provenance)  # names, not paths
    assert provenance["tokenizer"].startswith("legacy=True")


def test_converted_tokenizer_splits_at_the_image_as_llava_does(
    converted: tuple[pathlib.Path, pathlib.Path], original_llava: OriginalSet
) -> None:
    """The base's SentencePiece tokenizer ("legacy": false, as llava-v1.5-7b) would drop the
    ``▁`` that LLaVA's chunk-wise tokenizer_image_token puts after the image; the converted
    one keeps it, so the processor's ids are those of training."""
    base = LlamaTokenizer.from_pretrained(original_llava.base)  # the class it names
    base.add_tokens(["<image>"], special_tokens=True)
    assert not splits_like_llava(base)  # the tiny base reproduces the real problem
    processor = AutoProcessor.from_pretrained(converted[0])
    assert splits_like_llava(processor.tokenizer)
    text = answer_text("What is it?", "A cup.")
    before, after = text.split("<image>")
    chunked = base(before)["input_ids"] + base(after)["input_ids"][1:]  # tokenizer_image_token
    image = Image.new("RGB", (40, 40))
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [i for i in ids if i != image_id] == chunked
    assert base.convert_ids_to_tokens(chunked[1:3]) == ["▁", "<0x0A>"]


def test_head_in_non_lora_trainables(original_llava: OriginalSet, tmp_path: pathlib.Path) -> None:
    """A head saved in non_lora_trainables.bin (reference renaming: ``score.weight``) is
    used when the adapter weights have none; the adapter's wins when both do, as in peft."""
    o = original_llava
    moved = ob.build_reward_adapter(tmp_path / "moved", o.base, seed=3, head_in="non_lora")
    non_lora = torch.load(moved / "non_lora_trainables.bin", weights_only=True)
    out = convert_reward(o.base, moved, tmp_path / "out", vision_tower=o.clip)
    head = read_reward_checkpoint(out).score_weight
    assert torch.equal(head, non_lora["base_model.model.score.weight"])
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["score_head_from"] == "non_lora_trainables.bin:score.weight"
    both = copy_adapter(o.question, tmp_path / "both")
    non_lora = torch.load(both / "non_lora_trainables.bin", weights_only=True)
    non_lora["base_model.model.score.weight"] = torch.zeros(1, 64)
    torch.save(non_lora, both / "non_lora_trainables.bin")
    out = convert_reward(o.base, both, tmp_path / "out-both", vision_tower=o.clip)
    adapter_head = load_file(o.question / "adapter_model.safetensors")[
        "base_model.model.score.weight"
    ]
    assert torch.equal(read_reward_checkpoint(out).score_weight, adapter_head)


def test_tower_stored_in_the_base_and_rotary_buffers(tmp_path: pathlib.Path) -> None:
    """A base that stores the tower (``model.vision_tower.vision_tower.vision_model.*``)
    beside a CLIP folder without weights gives the same checkpoint as the tower read from the
    CLIP folder; old ``rotary_emb.inv_freq`` buffers are dropped."""
    with_weights = ob.build_clip_tower(tmp_path / "clip", image_size=28)
    config_only = ob.build_clip_tower(tmp_path / "clip-config", image_size=28, with_weights=False)
    plain = ob.build_original_base(tmp_path / "plain", with_weights)
    stored = ob.build_original_base(
        tmp_path / "stored", config_only, tower_in_base=True, rotary_buffers=True
    )
    adapter = ob.build_reward_adapter(tmp_path / "adapter", plain)
    a = convert_reward(plain, adapter, tmp_path / "a", vision_tower=with_weights)
    b = convert_reward(stored, adapter, tmp_path / "b", vision_tower=config_only)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert json.loads((b / PROVENANCE).read_text())["vision_tower_from"] == "base"


def test_mm_vision_tower_is_found_when_it_is_a_folder(tmp_path: pathlib.Path) -> None:
    clip = ob.build_clip_tower(tmp_path / "clip", image_size=28)
    named = ob.build_original_base(tmp_path / "named", clip, vision_tower_name=str(clip))
    adapter = ob.build_reward_adapter(tmp_path / "adapter", named)
    assert (convert_reward(named, adapter, tmp_path / "out") / PROVENANCE).is_file()
    hub = ob.build_original_base(tmp_path / "hub", clip)  # mm_vision_tower: a hub id
    # The adapter's config.json (the trained model's) is the one read, as in the reference.
    hub_adapter = ob.build_reward_adapter(tmp_path / "hub-adapter", hub)
    with pytest.raises(ConversionError, match="mm_vision_tower 'align2-tiny/clip-vision'"):
        convert_reward(named, hub_adapter, tmp_path / "out2")
    assert_nothing_left(tmp_path, "out2")


def test_cached_conversion_is_keyed_by_content(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    o = original_llava
    first = ensure_converted(o.base, o.question, o.clip, tmp_path)
    assert first.parent == tmp_path / "converted" / "v1"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(o.base, o.question, o.clip, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    edited = tmp_path / "edited"
    shutil.copytree(o.question, edited)
    non_lora = torch.load(edited / "non_lora_trainables.bin", weights_only=True)
    non_lora["base_model.model.model.mm_projector.0.bias"] += 1
    torch.save(non_lora, edited / "non_lora_trainables.bin")
    assert ensure_converted(o.base, edited, o.clip, tmp_path) != first


# -- refusals -------------------------------------------------------------------------------
def assert_nothing_left(parent: pathlib.Path, name: str) -> None:
    """No output folder and no temporary sibling (``.NAME.*``) after a failure."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def copy_adapter(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target)
    return target


def refuse(o: OriginalSet, adapter: pathlib.Path, out: pathlib.Path, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        convert_reward(o.base, adapter, out, vision_tower=o.clip)
    assert_nothing_left(out.parent, out.name)


def refuse_edited(
    o: OriginalSet, tmp_path: pathlib.Path, name: str, edit: dict[str, object], match: str
) -> None:
    """A copy of the question adapter whose JSON file ``name`` takes ``edit`` is refused."""
    adapter = copy_adapter(o.question, tmp_path / "adapter")
    (adapter / name).write_text(json.dumps(json.loads((adapter / name).read_text()) | edit))
    refuse(o, adapter, tmp_path / "out", match)


def test_refuses_an_unknown_key(original_llava: OriginalSet, tmp_path: pathlib.Path) -> None:
    adapter = copy_adapter(original_llava.question, tmp_path / "adapter")
    non_lora = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    non_lora["base_model.model.model.image_newline"] = torch.zeros(64)
    torch.save(non_lora, adapter / "non_lora_trainables.bin")
    refuse(original_llava, adapter, tmp_path / "out", r"unknown key 'model\.image_newline'")


def test_refuses_an_unknown_base_key(original_llava: OriginalSet, tmp_path: pathlib.Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(original_llava.base, base)
    shard = base / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.vision_resampler.weight"] = torch.zeros(2)
    torch.save(state, shard)
    with pytest.raises(ConversionError, match=r"model\.vision_resampler\.weight: unknown key"):
        convert_reward(
            base, original_llava.question, tmp_path / "out", vision_tower=original_llava.clip
        )
    assert_nothing_left(tmp_path, "out")


def test_refuses_a_projector_of_the_wrong_shape(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    adapter = copy_adapter(original_llava.question, tmp_path / "adapter")
    non_lora = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    non_lora["base_model.model.model.mm_projector.0.weight"] = torch.zeros(64, 33)
    torch.save(non_lora, adapter / "non_lora_trainables.bin")
    refuse(original_llava, adapter, tmp_path / "out", r"shape mismatch, \[64, 33\] where")


def test_refuses_lora_of_the_wrong_shape(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    """An adapter trained over another base: B @ A does not fit the base weight."""
    adapter = copy_adapter(original_llava.question, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    weights[key] = torch.zeros(48, 8)
    save_file(weights, adapter / "adapter_model.safetensors")
    refuse(
        original_llava,
        adapter,
        tmp_path / "out",
        r"shape mismatch at model\.layers\.1\.mlp\.down_proj",
    )


def test_refuses_lora_it_cannot_map(original_llava: OriginalSet, tmp_path: pathlib.Path) -> None:
    """LoRA on the projector (peft's own adapter): align2 merges into the LLM only."""
    adapter = ob.build_reward_adapter(
        tmp_path / "adapter", original_llava.base, target_modules=["q_proj", "mm_projector.0"]
    )
    refuse(
        original_llava,
        adapter,
        tmp_path / "out",
        r"LoRA on 'model\.mm_projector\.0' cannot be mapped",
    )


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"mm_projector_type": "linear"}, "unsupported projector type mm_projector_type='linear'"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end=True"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls'"),
    ],
)
def test_refuses_an_unsupported_model_config(
    original_llava: OriginalSet, tmp_path: pathlib.Path, edit: dict[str, object], match: str
) -> None:
    refuse_edited(original_llava, tmp_path, "config.json", edit, match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [({"use_dora": True}, "use_dora=True"), ({"bias": "all"}, "bias='all'")],
)
def test_refuses_lora_variants_it_does_not_merge(
    original_llava: OriginalSet, tmp_path: pathlib.Path, edit: dict[str, object], match: str
) -> None:
    refuse_edited(original_llava, tmp_path, "adapter_config.json", edit, match)


def test_refuses_an_adapter_without_a_head(
    original_llava: OriginalSet, tmp_path: pathlib.Path
) -> None:
    adapter = copy_adapter(original_llava.question, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    del weights["base_model.model.score.weight"]
    save_file(weights, adapter / "adapter_model.safetensors")
    refuse(original_llava, adapter, tmp_path / "out", "no score head")


def test_a_failure_while_writing_leaves_nothing(
    original_llava: OriginalSet, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the weights are written (here: saving the processor) removes the
    temporary folder, and the output never appears."""
    from transformers import LlavaProcessor

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_reward(
            original_llava.base,
            original_llava.question,
            tmp_path / "out",
            vision_tower=original_llava.clip,
        )
    assert_nothing_left(tmp_path, "out")


def test_refuses_to_overwrite(original_llava: OriginalSet, tmp_path: pathlib.Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_reward(
            original_llava.base,
            original_llava.question,
            tmp_path / "out",
            vision_tower=original_llava.clip,
        )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# -- the command --------------------------------------------------------------------------------
def test_command_converts_and_refuses(
    original_llava: OriginalSet, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    o = original_llava
    argv = ["convert-reward", "--base", str(o.base), "--adapter", str(o.question)]
    assert cli.main([*argv, "--out", str(tmp_path / "ok"), "--vision-tower", str(o.clip)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ok")
    assert (tmp_path / "ok" / PROVENANCE).is_file()
    with pytest.raises(SystemExit, match="align2 convert-reward: mm_vision_tower"):
        cli.main([*argv, "--out", str(tmp_path / "no-tower")])
    assert_nothing_left(tmp_path, "no-tower")
