"""Reading the config file: every refusal names the whole key; a refused file exits 2."""

from __future__ import annotations

import pathlib
import re

import pytest

from align2.server import cli
from align2.server import config as config_module
from align2.server.errors import ConfigError


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # unknown keys, at every depth, with the keys their table has
        ("[server]\nprot = 1", "server.prot: unknown key; [server] has: host, port,"),
        ("bogus = 1", "bogus: unknown key; the file has: server, limits,"),
        ("[align.decoding]\ntemprature = 1", "align.decoding.temprature: unknown key;"),
        ('[models.q]\npath = "x"\nsize = 1', "models.q.size: unknown key; [models.q] has:"),
        ('[models.q]\npath = "x"\n[models.q.vllm]\nfoo = 1', "models.q.vllm.foo: unknown key"),
        # missing values and wrong types, inside a model too
        ("[models.q]\nmax_length = 5", "models.q.path: missing (it has no default)"),
        ('[models.q]\npath = "x"\nmax_length = "a"', "models.q.max_length: must be int, got 'a'"),
        ('[limits]\nmax_turns = "x"', "limits.max_turns: must be int, got 'x'"),
        ('[align]\nreview = "yes"', "align.review: must be bool, got 'yes'"),
        (
            '[models.q]\npath = "x"\nimage_mode = "round"',
            "models.q.image_mode: must be one of 'pad', 'square'; got 'round'",
        ),
        # a value where a table belongs
        ("server = 3", "server: must be a table ([server]), got 3"),
        ("models = 3", "models: must be a table of models, got 3"),
        ("[models]\nq = 3", "models.q: must be a table, got 3"),
    ],
)
def test_a_refused_key_is_named_whole(tmp_path: pathlib.Path, toml: str, message: str) -> None:
    """Fails on: dacite's own messages ('can not match "prot" to any data class field',
    'missing value for field "path"'), which name neither the section nor the model."""
    file = tmp_path / "align2.toml"
    file.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_module.load(file)


def test_a_refused_config_exits_2_with_its_message(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input exits 2, as the README's exit statuses say; 1 stays an unrecoverable
    device error. Fails on: SystemExit(message), which exits 1."""
    file = tmp_path / "align2.toml"
    file.write_text("[server]\nprot = 1\n")
    assert cli.main(["serve", "--config", str(file)]) == 2
    assert "align2: server.prot: unknown key" in capsys.readouterr().err


def test_why_align_is_off_is_named() -> None:
    config = config_module.from_dict(
        {"models": {"question": {"path": "q"}}, "score": {"enabled": False}}
    )
    assert config.align_off_reason.startswith("[models] has no 'llm' (align.model)")
    off = config_module.from_dict({"align": {"enabled": False}})
    assert off.align_off_reason == "align.enabled = false"
    assert config_module.from_dict({}).align_off_reason == ""


def test_max_image_pixels_stays_within_what_pillow_opens() -> None:
    from PIL import Image

    assert 2 * (Image.MAX_IMAGE_PIXELS or 0) == config_module.MAX_IMAGE_PIXELS
    with pytest.raises(ConfigError, match=r"^limits.max_image_pixels: 1 to 178956970 \(Pillow"):
        config_module.from_dict({"limits": {"max_image_pixels": 400_000_000}})
    assert config_module.from_dict({"limits": {"max_image_pixels": 178_956_970}})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nhealth_port = -2", "server.health_port: -1 (none), 0 (a free one) or a port"),
        ("[server]\nhealth_port = 70000", "server.health_port: -1 (none), 0 (a free one)"),
        ("[server]\nport = 50051\nhealth_port = 50051", "server.health_port: 50051 is already"),
        ("[server]\nhealth_port = 9090", "server.health_port: 9090 is already the gRPC or metrics"),
    ],
)
def test_a_health_port_out_of_range_or_taken_is_refused(
    tmp_path: pathlib.Path, toml: str, message: str
) -> None:
    file = tmp_path / "align2.toml"
    file.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_module.load(file)
