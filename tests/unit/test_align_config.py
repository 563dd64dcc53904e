"""The [align] config section: defaults, auto-enabling, and checks that name the key."""

from __future__ import annotations

import pathlib

import pytest

from align2.server import config as config_module
from align2.server.errors import ConfigError


def test_defaults_serve_align_with_the_embedded_smollm2() -> None:
    config = config_module.load(None)
    assert config.align_enabled and config.score.enabled
    assert config.models["llm"].path == "embedded:smollm2-135m-instruct"
    assert (config.align.model, config.align.template, config.align.review) == (
        "llm",
        "default-v1",
        True,
    )
    assert config.align.decoding.temperature == 0.0  # greedy by default


def test_align_is_on_only_when_its_model_is_configured(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "score-only.toml"
    file.write_text('[models.question]\npath = "q"\n[models.answer]\npath = "a"\n')
    assert not config_module.load(file).align_enabled
    assert config_module.load(None, {"align.enabled": False}).align_enabled is False
    with pytest.raises(ConfigError, match=r"align\.model: unknown model 'llm'; \[models\] has"):
        config_module.load(file, {"align.enabled": True})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"align.decoding.top_p": 0.0}, r"align.decoding.top_p: 0.0 is not in \(0, 1\]"),
        (
            {"align.decoding.temperature": -1.0},
            r"align.decoding.temperature: -1.0 is neither 0 \(greedy\) nor in \[0.01, 2.0\]",
        ),
        ({"align.decoding.temperature": 1e-45}, r"align.decoding.temperature: 1e-45 is neither"),
        ({"align.decoding.temperature": 0.001}, r"align.decoding.temperature: 0.001 is neither"),
        ({"align.decoding.temperature": 2.5}, r"align.decoding.temperature: 2.5 is neither"),
        ({"align.decoding.temperature": 3e38}, r"align.decoding.temperature: 3e\+38 is neither"),
        (
            {"align.decoding.temperature": float("inf")},
            r"align.decoding.temperature: inf is neither",
        ),
        (
            {"align.decoding.temperature": float("nan")},
            r"align.decoding.temperature: nan is neither",
        ),
        ({"align.decoding.top_p": float("nan")}, r"align.decoding.top_p: nan is not in \(0, 1\]"),
        ({"align.decoding.seed": -1}, r"align.decoding.seed: -1 is not in 0..18446744073709551615"),
        (
            {"align.decoding.max_new_tokens": 2000},
            r"align\.decoding\.max_new_tokens: 2000 exceeds align\.max_new_tokens_limit 1024",
        ),
        ({"align.decoding.max_new_tokens": 0}, "align.decoding.max_new_tokens: 0 is less than 1"),
        ({"align.max_inflight_items": 0}, "align.max_inflight_items: must be at least 1"),
        ({"align.review": "yes"}, "align.review: must be bool, got 'yes'"),
        (
            {"score.enabled": False, "models.llm.path": "x", "models.llm.continuous_rows": -1},
            r"models\.llm\.continuous_rows: must be >= 0",
        ),
        (
            {"score.enabled": False, "models.llm.path": "x", "models.llm.length_split_tokens": -2},
            r"models\.llm\.length_split_tokens: must be >= -1 \(-1: by device, 0: one forward",
        ),
        ({"server.grace_seconds": -5.0}, r"server\.grace_seconds: must be >= 0, got -5\.0"),
        ({"server.log_level": "bogus"}, r"server\.log_level: 'bogus'; valid: DEBUG, INFO, WARNING"),
        (
            {"server.max_connection_age_seconds": float("nan")},
            r"server\.max_connection_age_seconds: must be >= 0, got nan",
        ),
        (
            {"server.max_connection_age_seconds": float("inf")},
            r"server\.max_connection_age_seconds: at most 2147483 \(gRPC's limit",
        ),
        ({"server.keepalive_seconds": -1.0}, r"server\.keepalive_seconds: must be >= 0"),
        (
            {"server.keepalive_seconds": float("inf")},
            r"server\.keepalive_seconds: at most 2147483",
        ),
        (
            {"server.keepalive_timeout_seconds": 0.0},
            r"server\.keepalive_timeout_seconds: must be > 0 when keepalive_seconds is set",
        ),
    ],
)
def test_bad_align_settings_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.load(None, overrides)


@pytest.mark.parametrize("temperature", [0.0, 0.01, 0.7, 2.0])
def test_temperatures_where_sampling_is_defined_are_accepted(temperature: float) -> None:
    config = config_module.load(None, {"align.decoding.temperature": temperature})
    assert config.align.decoding.temperature == temperature
