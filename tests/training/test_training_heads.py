"""Head files: lossless storage, installing into a checkpoint, the backbone revision, and the
untrained-head baseline."""

from __future__ import annotations

import hashlib
import pathlib
import shutil

import pytest
import torch

from align2.server.backends.checkpoint import read_reward_checkpoint
from align2.server.models import embedded, heads
from align2.server.models.builders import build_idefics3_reward
from align2.server.training.evaluate import untrained_head


def copy_of(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(folder, tmp_path / folder.name))


def head_for(folder: pathlib.Path, seed: int = 7) -> heads.TrainedHead:
    checkpoint = read_reward_checkpoint(folder)
    weight = torch.randn(
        checkpoint.score_weight.shape, generator=torch.Generator().manual_seed(seed)
    )
    return heads.TrainedHead.from_tensor(
        "question",
        weight.to(checkpoint.score_weight.dtype),
        backbone_revision=heads.backbone_revision(folder),
        template_version="t",
    )


def test_head_file_round_trips_exactly_in_bfloat16(tmp_path: pathlib.Path) -> None:
    weight = torch.randn(1, 576, dtype=torch.float32).to(torch.bfloat16)
    head = heads.TrainedHead.from_tensor(
        "answer", weight, backbone_revision="b", template_version="t"
    )
    path = heads.save(head, tmp_path / "out")
    assert path.name == "answer.json"
    loaded = heads.load(path)
    assert loaded == head
    assert torch.equal(loaded.tensor(), weight)


def test_load_refuses_another_format(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="format"):
        heads.load(path)


def test_install_replaces_only_the_head(
    tiny_idefics3: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    folder = copy_of(tiny_idefics3, tmp_path)
    before = heads.backbone_revision(folder)
    head = head_for(folder)
    heads.install(folder, head)
    checkpoint = read_reward_checkpoint(folder)
    assert torch.equal(checkpoint.score_weight, head.tensor())
    assert heads.backbone_revision(folder) == before == heads.backbone_revision(tiny_idefics3)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no scratch left


def test_install_refuses_a_head_of_another_size(
    tiny_idefics3: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    folder = copy_of(tiny_idefics3, tmp_path)
    wrong = heads.TrainedHead.from_tensor(
        "answer", torch.zeros(1, 3), backbone_revision="b", template_version="t"
    )
    with pytest.raises(ValueError, match=r"score\.weight"):
        heads.install(folder, wrong)


def test_install_warns_when_trained_on_another_backbone(
    tiny_idefics3: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_of(tiny_idefics3, tmp_path)
    head = head_for(folder)
    heads.install(folder, heads.TrainedHead(**{**head.__dict__, "backbone_revision": "other"}))
    assert "trained on backbone other" in caplog.text


def test_backbone_revision_tracks_the_weights(tmp_path: pathlib.Path) -> None:
    a = build_idefics3_reward(tmp_path / "a", seed=1, image_size=32, patch_size=16, scale_factor=2)
    b = build_idefics3_reward(tmp_path / "b", seed=2, image_size=32, patch_size=16, scale_factor=2)
    assert heads.backbone_revision(a) != heads.backbone_revision(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_untrained_head_is_the_builders_head(dtype: torch.dtype, tmp_path: pathlib.Path) -> None:
    folder = build_idefics3_reward(
        tmp_path / "m", seed=5, image_size=32, patch_size=16, scale_factor=2, dtype=dtype
    )
    stored = read_reward_checkpoint(folder).score_weight
    assert torch.equal(untrained_head(folder, seed=5), stored)
    assert not torch.equal(untrained_head(folder, seed=6), stored)


SHIPPED_HEADS = {4: "b04d2347c0367d2d"}
"""embedded.RECIPE_VERSION -> sha256 prefix of the shipped question.json + answer.json."""


def test_shipped_heads_change_only_with_the_embedded_recipe_version() -> None:
    # Embedded models are cached by recipe version: new heads under an old version would
    # leave every existing cache serving the old heads.
    digest = hashlib.sha256()
    for head in ("question", "answer"):
        digest.update((heads.SHIPPED_DIR / f"{head}.json").read_bytes())
    assert SHIPPED_HEADS.get(embedded.RECIPE_VERSION) == digest.hexdigest()[:16], (
        "the shipped heads changed: bump embedded.RECIPE_VERSION and record it here"
    )
