"""Model runtimes behind the backend seam (see base.py), chosen per model in config.

The registry is a dict of factories; each imports its runtime only when used, so a server
that runs transformers never imports vLLM.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from align2.server.backends.base import ScoringBackend
from align2.server.config import ModelConfig
from align2.server.errors import ConfigError

ScoringFactory = Callable[[str, ModelConfig, pathlib.Path], ScoringBackend]


def _transformers_scoring(name: str, config: ModelConfig, path: pathlib.Path) -> ScoringBackend:
    from align2.server.backends.transformers_scoring import TransformersScoring

    return TransformersScoring.load(name, config, path)


def _vllm_scoring(name: str, config: ModelConfig, path: pathlib.Path) -> ScoringBackend:
    from align2.server.backends.vllm_scoring import VllmScoring

    return VllmScoring.load(name, config, path)


SCORING_BACKENDS: dict[str, ScoringFactory] = {
    "transformers": _transformers_scoring,
    "vllm": _vllm_scoring,
}


def check_backend(name: str, config: ModelConfig) -> None:
    """Raise ConfigError naming the key and the valid backends for an unknown backend."""
    if config.backend not in SCORING_BACKENDS:
        raise ConfigError(
            f"models.{name}.backend: unknown backend {config.backend!r}; "
            f"valid: {', '.join(sorted(SCORING_BACKENDS))}"
        )


def load_scoring(name: str, config: ModelConfig, path: pathlib.Path) -> ScoringBackend:
    """Load the reward model in folder ``path`` with the backend its config names."""
    check_backend(name, config)
    return SCORING_BACKENDS[config.backend](name, config, path)
