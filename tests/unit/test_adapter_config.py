"""Config entries that name a LoRA reward adapter: what is refused before anything loads."""

from __future__ import annotations

import pathlib

import pytest

from align2.server import config as config_module
from align2.server.errors import ConfigError


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "align2.toml"
    path.write_text(text)
    return path


def test_base_and_adapter_are_read(tmp_path: pathlib.Path) -> None:
    config = config_module.load(
        write(
            tmp_path,
            """
[models.question]
path = "/m/llava-v1.5-7b"
adapter = "/m/align2llava-7b-lora-question"
vision_tower = "/m/clip-vit-large-patch14-336"
[models.answer]
path = "/m/llava-v1.5-7b"
adapter = "/m/align2llava-7b-lora-answer"
""",
        )
    )
    assert config.models["question"].adapter == "/m/align2llava-7b-lora-question"
    assert config.models["question"].vision_tower == "/m/clip-vit-large-patch14-336"
    assert config.models["answer"].vision_tower == ""


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            '[models.question]\npath = "q"\nvision_tower = "clip"\n[models.answer]\npath = "a"\n',
            "models.question.vision_tower: only used with an adapter",
        ),
        (
            '[models.question]\npath = "q"\n[models.answer]\npath = "a"\n'
            '[models.llm]\npath = "l"\nadapter = "x"\n',
            "models.llm.adapter: adapters are reward models",
        ),
    ],
)
def test_misplaced_adapter_settings_name_the_key(
    tmp_path: pathlib.Path, models: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.load(write(tmp_path, models))
