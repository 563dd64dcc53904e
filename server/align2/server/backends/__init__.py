"""Model runtimes behind the backend seam (see base.py), chosen per model in config.

The registry is a dict of factories; each imports its runtime only when used, so a server
that runs transformers never imports vLLM. An App takes a :class:`Registry` (by default
these two dicts): benchmarks and tests that serve a backend of their own pass one with it
added, and never edit the module's dicts.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from align2.server.backends.base import GenerationBackend, ScoringBackend
from align2.server.config import ModelConfig
from align2.server.errors import ConfigError

ScoringFactory = Callable[[str, ModelConfig, pathlib.Path], ScoringBackend]
GenerationFactory = Callable[[str, ModelConfig, pathlib.Path], GenerationBackend]


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


def _transformers_generation(
    name: str, config: ModelConfig, path: pathlib.Path
) -> GenerationBackend:
    from align2.server.backends.transformers_generation import TransformersGeneration

    return TransformersGeneration.load(name, config, path)


def _vllm_generation(name: str, config: ModelConfig, path: pathlib.Path) -> GenerationBackend:
    from align2.server.backends.vllm_generation import VllmGeneration

    return VllmGeneration.load(name, config, path)


GENERATION_BACKENDS: dict[str, GenerationFactory] = {
    "transformers": _transformers_generation,
    "vllm": _vllm_generation,
}


@dataclass(frozen=True)
class Registry:
    """The factories an App loads its models with, by backend name."""

    scoring: Mapping[str, ScoringFactory] = field(default_factory=lambda: dict(SCORING_BACKENDS))
    generation: Mapping[str, GenerationFactory] = field(
        default_factory=lambda: dict(GENERATION_BACKENDS)
    )

    def adding(
        self,
        *,
        scoring: Mapping[str, ScoringFactory] | None = None,
        generation: Mapping[str, GenerationFactory] | None = None,
    ) -> Registry:
        """This registry with more backends (e.g. one a benchmark built in memory)."""
        return Registry(
            {**self.scoring, **(scoring or {})}, {**self.generation, **(generation or {})}
        )


def check_backend(
    name: str, config: ModelConfig, registry: Mapping[str, object] = SCORING_BACKENDS
) -> None:
    """Raise ConfigError naming the key and the valid backends for an unknown backend."""
    if config.backend not in registry:
        raise ConfigError(
            f"models.{name}.backend: unknown backend {config.backend!r}; "
            f"valid: {', '.join(sorted(registry))}"
        )


def load_scoring(
    name: str,
    config: ModelConfig,
    path: pathlib.Path,
    factories: Mapping[str, ScoringFactory] = SCORING_BACKENDS,
) -> ScoringBackend:
    """Load the reward model in folder ``path`` with the backend its config names."""
    check_backend(name, config, factories)
    return factories[config.backend](name, config, path)


def load_shared_scoring(
    models: Mapping[str, ModelConfig], cache_dir: pathlib.Path
) -> dict[str, ScoringBackend]:
    """Backends for reward models with ``share_base``: ONE base in memory per
    ``ModelConfig.base_key``, each model's LoRA adapter, projector and head applied to it per
    batch (shared_scoring). ``embedded:NAME`` paths are built in ``cache_dir`` first. Raises
    ConfigError naming the model whose adapter is refused."""
    from align2.server.backends.shared_scoring import load_shared
    from align2.server.models import embedded
    from align2.server.models.llava_original import ConversionError
    from align2.server.models.shared_llava import HeadInputs, read_head

    groups: dict[tuple[str, str], dict[str, ModelConfig]] = {}
    for name, model in models.items():
        groups.setdefault(model.base_key, {})[name] = model
    loaded: dict[str, ScoringBackend] = {}
    for (path, tower), group in groups.items():
        base = embedded.resolve(path, cache_dir)
        tower_folder = embedded.resolve(tower, cache_dir) if tower else None
        heads: dict[str, tuple[ModelConfig, HeadInputs]] = {}
        for name, model in group.items():
            adapter = embedded.resolve(model.adapter, cache_dir)
            try:
                heads[name] = (model, read_head(base, adapter, tower_folder))
            except ConversionError as exc:
                raise ConfigError(f"models.{name}.adapter: {exc}") from exc
        try:
            loaded |= load_shared(base, heads)
        except ConversionError as exc:
            raise ConfigError(f"models.{', '.join(group)}: share_base: {exc}") from exc
    return loaded


def load_generation(
    name: str,
    config: ModelConfig,
    path: pathlib.Path,
    factories: Mapping[str, GenerationFactory] = GENERATION_BACKENDS,
) -> GenerationBackend:
    """Load the causal LM (the inner LLM) in folder ``path`` with the backend its config names."""
    check_backend(name, config, factories)
    return factories[config.backend](name, config, path)
