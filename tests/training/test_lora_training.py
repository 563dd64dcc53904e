"""``align2 train-lora`` on a tiny release-format base: what it writes is the release's
layout, the server and an independent PEFT forward score it as the tool does, reruns are
byte-identical, and the training forward is the server's."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import shutil

import pytest
import torch
from lora_reference import Reference
from PIL import Image

from align2.server import cli
from align2.server.models import llava_original as orig
from align2.server.training import data, lora
from align2.server.training.layer_inputs import capture
from align2.server.training.lora_pipeline import TrainLoraConfig, load_head, run
from align2.server.training.lora_selection import Selection


@pytest.fixture(scope="module")
def lora_config(original_llava, preference_dir, tmp_path_factory) -> TrainLoraConfig:
    root = tmp_path_factory.mktemp("train-lora")
    return TrainLoraConfig(
        data_dir=preference_dir,
        cache_dir=root / "cache",
        base=str(original_llava.base),
        vision_tower=str(original_llava.clip),
        out=root / "adapters",
        evaluate_test=True,
        layers=1,  # of the tiny base's 2
        val_fraction=0.3,
        train=lora.LoraTrainConfig(epochs=2, groups_per_step=2),
        selection={
            "question": Selection((1e-3, 1e-2)),
            "answer": Selection((1e-3, 1e-2), folds=3),
        },
    )


@pytest.fixture(scope="module")
def trained(lora_config: TrainLoraConfig):
    return asyncio.run(run(lora_config))


def test_adapters_are_written_in_the_release_layout(trained, lora_config) -> None:
    assert [r.head for r in trained] == ["question", "answer"]
    for report in trained:
        adapter = orig.read_adapter(
            lora_config.out / f"reward-{report.head}-lora"
        )  # the release's reader
        assert adapter.peft_config["task_type"] == "SEQ_CLS"
        assert adapter.scaling == 2.0  # alpha 16 / r 8
        assert sorted(adapter.lora) == sorted(
            f"model.layers.1.{part}" for part in _MODULES
        )  # the top layer only
        assert adapter.head is not None and tuple(adapter.head.shape) == (1, 64)
        # B moved from PEFT's zero start exactly when a trained epoch was kept.
        moved = any(bool(b.abs().sum() > 0) for _, b in adapter.lora.values())
        assert moved == (report.best_epoch > 0)
        # The kept epoch is the best on validation (held-out or out-of-fold); epoch 0 is
        # the untrained adapter, whose accuracy the untrained baseline measures.
        accuracies = [e.validation for e in report.epochs]
        assert len(accuracies) == lora_config.train.epochs + 1
        assert accuracies[report.best_epoch] == max(accuracies)
        assert accuracies[0] == pytest.approx(report.splits[0].untrained)
        assert report.served_difference < 1e-4
    question, answer = trained
    assert [s.split for s in question.splits] == ["validation", "test"]
    assert question.folds == 0 and question.train_pairs < len(_pairs(lora_config, "question"))
    # k-fold: every group is scored out of fold, and the adapter is trained on all of them.
    assert [s.split for s in answer.splits] == ["3-fold", "test"]
    assert answer.folds == 3 and answer.splits[0].pairs == len(_pairs(lora_config, "answer"))
    assert answer.train_pairs == answer.splits[0].pairs


def _pairs(config: TrainLoraConfig, head: str) -> torch.Tensor:
    name = {"question": "question-train.json", "answer": "answer-dev.json"}[head]
    return data.pairs(data.load(config.data_dir / name, head).groups)


_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def test_reference_peft_forward_scores_the_trained_adapter_as_the_server(
    trained, lora_config, original_llava, tmp_path: pathlib.Path
) -> None:
    """PeftModel.from_pretrained over the reference's model structure (tests/lora_reference)
    is an independent reading of the written files."""
    adapter = pathlib.Path(
        shutil.copytree(lora_config.out / "reward-answer-lora", tmp_path / "answer")
    )
    # The reference loader wants non_lora_trainables.bin: the base's (untrained) projector.
    base_state = torch.load(
        next(iter(sorted(original_llava.base.glob("pytorch_model-*.bin")))), weights_only=True
    )
    for shard in sorted(original_llava.base.glob("pytorch_model-*.bin"))[1:]:
        base_state |= torch.load(shard, weights_only=True)
    projector = {f"base_model.model.{k}": v for k, v in base_state.items() if "mm_projector" in k}
    assert len(projector) == 4
    torch.save(projector, adapter / "non_lora_trainables.bin")
    reference = Reference(original_llava.base, original_llava.clip, adapter)
    texts = data.load(lora_config.data_dir / "answer-dev.json", "answer").texts[:4]
    image = Image.new("RGB", (56, 56), (30, 140, 200))  # square: pad mode changes nothing
    backend = load_head("answer", original_llava.base, adapter, original_llava.clip)
    try:
        batch = [backend.prepare(t, image, max_text_tokens=2048, truncate=True) for t in texts]
        served = asyncio.run(backend.score(batch))
    finally:
        backend.close()
    expected = [reference.score(t, image) for t in texts]
    assert served == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert len(set(served)) == len(served)


def test_training_forward_equals_the_server_on_a_trained_adapter(
    trained, lora_config, original_llava
) -> None:
    """Tail (the top layers on captured inputs) == the served pooled features, with LoRA
    weights that are not zero (the tool checks only the untrained adapter at each run)."""
    texts = data.load(lora_config.data_dir / "question-train.json", "question").texts[:6]
    backend = load_head(
        "question",
        original_llava.base,
        lora_config.out / "reward-question-lora",
        original_llava.clip,
    )
    try:
        model = backend.shared_base.model.language_model
        states, pooled, _ = asyncio.run(
            capture(backend, model.layers[1], texts, batch_size=4, max_text_tokens=2048)
        )
        with torch.no_grad():
            mine = lora.Tail(model, 1).pooled(states)
    finally:
        backend.close()
    torch.testing.assert_close(mine, pooled, rtol=1e-5, atol=1e-5)


def test_a_rerun_writes_identical_adapters_from_the_cached_layer_inputs(
    trained, lora_config, tmp_path: pathlib.Path
) -> None:
    again = asyncio.run(run(dataclasses.replace(lora_config, out=tmp_path / "again")))
    assert [r.layer_inputs_cached for r in trained] == [False, False]
    assert [r.layer_inputs_cached for r in again] == [True, True]
    for head in ("question", "answer"):
        for name in ("adapter_model.safetensors", "adapter_config.json", "align2_training.json"):
            folder = f"reward-{head}-lora"
            first = (lora_config.out / folder / name).read_bytes()
            assert (tmp_path / "again" / folder / name).read_bytes() == first, (head, name)


def test_train_lora_command_reports_both_heads(
    trained,
    lora_config,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["train-lora", "--data", str(lora_config.data_dir)]
    argv += ["--cache-dir", str(lora_config.cache_dir), "--base", lora_config.base]
    argv += ["--vision-tower", lora_config.vision_tower, "--layers", "1", "--epochs", "1"]
    argv += ["--val-fraction", "0.3", "--heads", "answer"]
    assert cli.main(argv) == 0
    report = capsys.readouterr().out
    assert "| answer | 3-fold | answer-dev.json |" in report
    assert "answer: LoRA r=8 alpha=16 on layers 1-1" in report
    assert "| question |" not in report and "| answer | test |" not in report
