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


_PAIR = """
[models.question]
path = "/m/llava-v1.5-7b"
adapter = "/m/align2llava-7b-lora-question"
vision_tower = "/m/clip"
share_base = true
[models.answer]
path = "/m/llava-v1.5-7b"
adapter = "/m/align2llava-7b-lora-answer"
vision_tower = "/m/clip"
share_base = true
"""


def test_two_adapters_may_share_one_base(tmp_path: pathlib.Path) -> None:
    config = config_module.load(write(tmp_path, _PAIR))
    question, answer = config.models["question"], config.models["answer"]
    assert question.share_base and answer.share_base
    assert question.base_key == answer.base_key == ("/m/llava-v1.5-7b", "/m/clip")


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            '[models.question]\npath = "q"\nshare_base = true\n[models.answer]\npath = "a"\n',
            "models.question.share_base: needs an adapter",
        ),
        (
            _PAIR.replace(
                "share_base = true\n[models.answer]",
                'backend = "vllm"\nshare_base = true\n[models.answer]',
            ),
            "models.question.share_base: the transformers backend only, got 'vllm'",
        ),
        (
            _PAIR + 'dtype = "bfloat16"\n',
            "models.answer.dtype: 'bfloat16' differs from models.question.dtype 'float32'",
        ),
        (
            _PAIR + 'device = "cuda"\n',
            "models.answer.device: 'cuda' differs from models.question.device 'auto'",
        ),
    ],
)
def test_a_shared_base_that_cannot_be_shared_is_refused(
    tmp_path: pathlib.Path, models: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.load(write(tmp_path, models))


def test_models_over_other_bases_need_not_agree(tmp_path: pathlib.Path) -> None:
    other = _PAIR.replace('adapter = "/m/align2llava-7b-lora-answer"', 'adapter = "/m/x"').replace(
        'path = "/m/llava-v1.5-7b"\nadapter = "/m/x"', 'path = "/m/other"\nadapter = "/m/x"'
    )
    config = config_module.load(write(tmp_path, other + 'dtype = "bfloat16"\n'))
    assert config.models["answer"].base_key != config.models["question"].base_key
