"""ModelRef.settings (backends/base.with_settings): a digest of what changes a model's
outputs beyond its files, so stored scores are reused only where they still hold."""

from __future__ import annotations

import dataclasses

from align2.server.backends.base import ModelDescription, with_settings

BASE = ModelDescription(
    name="question",
    model_id="m",
    revision="abc123abc123",
    backend="transformers",
    family="llava",
    dtype="bfloat16",
    device="cuda:0",
    max_length=2048,
    image_tokens=576,
    image_mode="pad",
)
SERVER = {"image_exif_transpose": False, "truncation": "reject", "max_text_tokens": 2048}


def test_each_setting_that_changes_a_score_changes_the_digest() -> None:
    base = with_settings(BASE, **SERVER).settings
    assert len(base) == 12 and int(base, 16) >= 0
    described = [
        dataclasses.replace(BASE, dtype="float16"),
        dataclasses.replace(BASE, image_mode="square"),
        dataclasses.replace(BASE, backend="vllm"),
        dataclasses.replace(BASE, max_length=4096),
    ]
    digests = {with_settings(d, **SERVER).settings for d in described}
    for key, value in (
        ("image_exif_transpose", True),
        ("truncation", "truncate"),
        ("max_text_tokens", 1024),
    ):
        digests.add(with_settings(BASE, **{**SERVER, key: value}).settings)
    assert base not in digests and len(digests) == 7


def test_what_does_not_change_a_score_leaves_it() -> None:
    """The device, the config name and the revision (reported apart) are not in it: a job
    resumed on another GPU, or under another model name, reuses its scores."""
    base = with_settings(BASE, **SERVER).settings
    moved = dataclasses.replace(BASE, device="cuda:1", name="q2", revision="fff")
    assert with_settings(moved, **SERVER).settings == base
    assert with_settings(BASE, **dict(reversed(SERVER.items()))).settings == base  # order
