"""Reading the paper's released reward models: original-LLaVA bases and PEFT LoRA adapters.

The released reward models (``Huanghz/align2llava-7b-lora-question`` / ``-answer``) are LoRA
adapters over ``liuhaotian/llava-v1.5-7b`` in the original LLaVA code's layout, not Hugging
Face's ``llava`` model type. This module reads the three inputs and maps every tensor to
its place in transformers' ``LlavaForConditionalGeneration``; it refuses, naming the key,
whatever it does not understand. Facts read from the reference code:

Base (haotian-liu/LLaVA ``llava/model/language_model/llava_llama.py``, ``llava_arch.py``):
    ``config.json`` is a Llama config plus ``mm_*`` fields (``model_type`` "llava" in
    llava-v1.5-7b, "llava_llama" in later code: both clash with or differ from HF's, so the
    format is told by ``mm_vision_tower`` and the absence of ``text_config``). Weights:
    ``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``,
    ``lm_head.weight``, ``model.mm_projector.{0,2}.{weight,bias}`` (``mlp2x_gelu`` =
    Linear, GELU, Linear: ``multimodal_projector/builder.py``), sometimes
    ``model.layers.N.self_attn.rotary_emb.inv_freq`` buffers, and optionally the tower as
    ``model.vision_tower.vision_tower.vision_model.*``.
Vision tower (``llava/model/multimodal_encoder/clip_encoder.py``): ``CLIPVisionTower`` is
    delay-loaded, then ``CLIPVisionModel.from_pretrained(mm_vision_tower)`` and
    ``CLIPImageProcessor.from_pretrained(mm_vision_tower)``; the CLIP folder's weights are
    ``vision_model.*`` (``text_model.*``, the projections and ``logit_scale`` belong to the
    text half). Features: ``hidden_states[mm_vision_select_layer]``, ``patch`` drops CLS
    (``[:, 1:]``) = HF strategy "default", ``cls_patch`` keeps it = "full".
Adapter (DCDmllm/Align2LLaVA ``reward_model/train.py``, ``reward_model/llava/train/
    llava_trainer.py``): ``LlavaLlamaModelForSequenceClassification`` (``reward_model/llava/
    model/language_model/llava_llama.py``: ``self.model``, ``self.score = Linear(hidden, 1,
    bias=False)``) wrapped by ``get_peft_model(LoraConfig(task_type="SEQ_CLS",
    target_modules=find_all_linear_names(model)))``, so every Linear of the LLM except
    ``score`` gets LoRA and peft puts ``score`` in ``modules_to_save``. Saved with
    ``llava_trainer.get_peft_state_maybe_zero_3`` (params with ``lora_`` or
    ``modules_to_save``) into ``adapter_model.{bin,safetensors}``:
    ``base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight``,
    ``base_model.model.model.layers.N.mlp.{gate,up,down}_proj.lora_{A,B}.weight`` and the
    head as ``base_model.model.score.weight`` (peft drops ``modules_to_save.`` and the
    adapter name); and ``get_peft_state_non_lora_maybe_zero_3`` (other trainable params)
    into ``non_lora_trainables.bin``: ``base_model.model.model.mm_projector.{0,2}.
    {weight,bias}``. ``config.json`` in the adapter is the trained model's config, and the
    reference loader uses it, not the base's (``reward_model/llava/model/builder.py``:
    ``LlavaConfig.from_pretrained(model_path)``). Note: the functions of the same names in
    ``reward_model/llava/train/train.py`` lack the ``modules_to_save`` clause; the reward
    trainer imports the ``llava_trainer`` ones.
Loader (both repos' ``llava/model/builder.py``): ``non_lora_trainables`` keys lose
    ``base_model.`` and then, if any starts with ``model.model.``, one ``model.``; loaded
    with ``strict=False``; then ``PeftModel.from_pretrained`` and ``merge_and_unload``,
    which gives ``W + scaling * B @ A`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)``
    with rslora). A head found in ``non_lora_trainables`` is accepted too; the adapter's
    wins, as it does in the reference loader.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from align2.server.formats import SCORE_KEY


class ConversionError(ValueError):
    """An input align2 does not understand; the message names the file and the key."""


# -- the mapping from original to HF names (LlavaForConditionalGeneration in memory) ---------
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LORA_TARGET = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
_PROJECTOR = {"0": "linear_1", "2": "linear_2"}
_TOWER_IN_BASE = "model.vision_tower.vision_tower.vision_model."
_CLIP_TEXT_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
HF_TOWER = "model.vision_tower."
HF_PROJECTOR = "model.multi_modal_projector."


def hf_name(key: str) -> str | None:
    """The HF name of an original-layout base key; None for buffers that HF recomputes
    (rotary ``inv_freq``, CLIP ``position_ids``). An unmapped key keeps its name, so that the
    caller's check against the model's keys refuses it by name."""
    if key.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")):
        return None
    if key.startswith(_TOWER_IN_BASE):
        return HF_TOWER + key.removeprefix(_TOWER_IN_BASE)
    projector = re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key)
    if projector and projector.group(1) in _PROJECTOR:
        return f"{HF_PROJECTOR}{_PROJECTOR[projector.group(1)]}.{projector.group(2)}"
    if key == "lm_head.weight":
        return key
    if key.startswith("model.") and not key.startswith(("model.mm_projector.", "model.vision")):
        return "model.language_model." + key.removeprefix("model.")
    return key


def clip_hf_name(key: str) -> str | None:
    """The HF name of a CLIP folder key (``vision_model.*``, or bare as transformers 5 saves a
    ``CLIPVisionModel``); None for the text half and buffers."""
    if key.startswith(_CLIP_TEXT_HALF) or key.endswith("position_ids"):
        return None
    return HF_TOWER + key.removeprefix("vision_model.")


# -- weight files ---------------------------------------------------------------------------
def weight_files(folder: pathlib.Path, stem: str = "model") -> list[pathlib.Path]:
    """The weight files of a folder, safetensors first, shards via their index.

    ``stem``: ``model`` for model folders (``model.safetensors``, ``pytorch_model.bin``),
    ``adapter_model`` for PEFT adapters. Empty when there are none.
    """
    bin_stem = "pytorch_model" if stem == "model" else stem
    for index, single in (
        (f"{stem}.safetensors.index.json", f"{stem}.safetensors"),
        (f"{bin_stem}.bin.index.json", f"{bin_stem}.bin"),
    ):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    return []


def iter_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``files``, loaded lazily where the format allows (safetensors by key,
    ``.bin`` memory-mapped), never unpickling code (``weights_only``)."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    yield key, handle.get_tensor(key)
        else:
            yield from load_bin(file).items()


def load_bin(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """A torch-pickled state dict, tensors only (``weights_only``), memory-mapped when the
    file is a zip archive (every torch >= 1.6 save)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) format: no mmap
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{file}: not a state dict of tensors")
    return state


def read_json(file: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{file}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{file}: not a JSON object")
    return data


# -- the base and its vision tower ------------------------------------------------------------
@dataclass(frozen=True)
class OriginalBase:
    """An original-LLaVA model folder: its config and weight files (read lazily)."""

    folder: pathlib.Path
    config: dict[str, Any]
    files: list[pathlib.Path]


def read_base(folder: pathlib.Path) -> OriginalBase:
    """Validate ``folder`` as an original-LLaVA base (config with ``mm_vision_tower``)."""
    config = read_json(folder / "config.json")
    if "text_config" in config or "mm_vision_tower" not in config:
        raise ConversionError(
            f"{folder}/config.json is not an original-LLaVA config (it needs mm_vision_tower "
            "and no text_config); a Hugging Face llava folder is served as it is"
        )
    files = weight_files(folder)
    if not files:
        raise ConversionError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")
    return OriginalBase(folder, config, files)


def check_supported(config: dict[str, Any], source: pathlib.Path) -> None:
    """Refuse the original-LLaVA variants that an HF ``LlavaForConditionalGeneration`` does
    not compute the same way, naming the config key."""
    expected: dict[str, tuple[object, ...]] = {
        "model_type": ("llava", "llava_llama"),
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_vision_select_feature": ("patch", "cls_patch"),
        "mm_patch_merge_type": ("flat",),
        "mm_use_im_start_end": (False,),
        "hidden_act": ("silu",),
        "tie_word_embeddings": (False,),
        "rope_scaling": (None,),
    }
    defaults = {"mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat"}
    for key, allowed in expected.items():
        value = config.get(key, defaults.get(key))
        if value not in allowed:
            kind = "projector type" if key == "mm_projector_type" else "value"
            raise ConversionError(
                f"{source}: unsupported {kind} {key}={value!r}; align2 converts "
                f"{' or '.join(repr(a) for a in allowed)}"
            )
    if str(config.get("image_aspect_ratio", "pad")).startswith("anyres"):
        raise ConversionError(f"{source}: image_aspect_ratio anyres (LLaVA-NeXT) is unsupported")
    if not isinstance(config.get("mm_vision_select_layer"), int):
        raise ConversionError(f"{source}: mm_vision_select_layer must be an integer")


@dataclass(frozen=True)
class VisionTower:
    """The CLIP folder ``mm_vision_tower`` names: config, preprocessing, weights (maybe none)."""

    folder: pathlib.Path
    files: list[pathlib.Path]


def resolve_tower(config: dict[str, Any], given: pathlib.Path | None) -> VisionTower:
    """The CLIP folder: ``given``, else ``mm_vision_tower`` when that is a folder here."""
    folder = given
    if folder is None:
        named = pathlib.Path(str(config["mm_vision_tower"])).expanduser()
        if not named.is_dir():
            raise ConversionError(
                f"mm_vision_tower {config['mm_vision_tower']!r} is not a folder here: "
                "download that CLIP model and name its folder (--vision-tower, or "
                "vision_tower in the model's config)"
            )
        folder = named
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise ConversionError(f"{folder}: no {name} (the CLIP vision tower's folder)")
    return VisionTower(folder, weight_files(folder))


# -- the adapter ------------------------------------------------------------------------------
@dataclass
class Adapter:
    """A PEFT LoRA adapter of the reference's reward training, read and checked."""

    folder: pathlib.Path
    peft_config: dict[str, Any]
    model_config: dict[str, Any] | None
    """The adapter's own config.json (the reference loads the model with it), if any."""
    scaling: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Original module name (``model.layers.0.self_attn.q_proj``) -> (A [r, in], B [out, r])."""
    head: torch.Tensor | None = None
    head_source: str = ""
    projector: dict[str, torch.Tensor] = field(default_factory=dict)
    """Original key (``model.mm_projector.0.weight``) -> tensor, from non_lora_trainables."""


# Fields of a LoRA config that change what the adapter computes beyond W + s * B @ A, with
# the value(s) under which align2's merge is exact.
_PLAIN_LORA: dict[str, tuple[object, ...]] = {
    "peft_type": ("LORA",),
    "bias": ("none",),
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


def read_adapter(folder: pathlib.Path) -> Adapter:
    """Read ``adapter_config.json``, the adapter weights and ``non_lora_trainables.bin``."""
    config_file = folder / "adapter_config.json"
    peft_config = read_json(config_file)
    for key, allowed in _PLAIN_LORA.items():
        if key in peft_config and peft_config[key] not in allowed:
            raise ConversionError(
                f"{config_file}: {key}={peft_config[key]!r} is unsupported (align2 merges "
                f"plain LoRA: {key} must be {' or '.join(repr(a) for a in allowed)})"
            )
    rank, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise ConversionError(f"{config_file}: r and lora_alpha must be numbers, r >= 1")
    scaling = alpha / math.sqrt(rank) if peft_config.get("use_rslora") else alpha / rank
    model_config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    adapter = Adapter(folder, peft_config, model_config, scaling)
    files = weight_files(folder, "adapter_model")
    if not files:
        raise ConversionError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    _read_lora(adapter, files)
    non_lora = folder / "non_lora_trainables.bin"
    if non_lora.is_file():
        _read_non_lora(adapter, non_lora)
    if adapter.head is None:
        raise ConversionError(
            f"{folder}: no score head (base_model.model.score.weight in the adapter weights, "
            "or score.weight in non_lora_trainables.bin): not a reward adapter"
        )
    return adapter


def _read_lora(adapter: Adapter, files: list[pathlib.Path]) -> None:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    targets = adapter.peft_config.get("target_modules")
    for key, tensor in iter_tensors(files):
        name = key.removeprefix("base_model.model.")
        if name == SCORE_KEY:  # modules_to_save, as peft saves it
            adapter.head, adapter.head_source = tensor, f"{files[0].name}:{key}"
            continue
        lora = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if lora is None or name == key:
            raise ConversionError(
                f"{adapter.folder}/{files[0].name}: unknown key {key!r} (align2 reads "
                f"base_model.model.<module>.lora_A/lora_B.weight and {SCORE_KEY})"
            )
        module = lora.group(1)
        if not _LORA_TARGET.fullmatch(module):
            raise ConversionError(
                f"{adapter.folder}: LoRA on {module!r} cannot be mapped; align2 merges LoRA "
                "into the language model's model.layers.N.self_attn.{q,k,v,o}_proj and "
                "model.layers.N.mlp.{gate,up,down}_proj only"
            )
        if isinstance(targets, list) and module.rsplit(".", 1)[-1] not in targets:
            raise ConversionError(
                f"{adapter.folder}: LoRA on {module!r}, which adapter_config.json "
                f"target_modules {sorted(targets)} does not name"
            )
        pairs.setdefault(module, {})[lora.group(2)] = tensor
    rank = adapter.peft_config["r"]
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ConversionError(f"{adapter.folder}: {module} has lora_A or lora_B alone")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ConversionError(
                f"{adapter.folder}: shape mismatch at {module}: lora_A {list(a.shape)}, "
                f"lora_B {list(b.shape)}, r={rank} (expected [r, in] and [out, r])"
            )
        adapter.lora[module] = (a, b)
    if not adapter.lora:
        raise ConversionError(f"{adapter.folder}: the adapter holds no LoRA weights")


def _read_non_lora(adapter: Adapter, file: pathlib.Path) -> None:
    """The reference loader's renaming, then the projector and (maybe) the head."""
    state = load_bin(file)
    state = {k.removeprefix("base_model."): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    for key, tensor in state.items():
        if re.fullmatch(r"model\.mm_projector\.[02]\.(weight|bias)", key):
            adapter.projector[key] = tensor
        elif key == SCORE_KEY:
            if adapter.head is None:  # the adapter's modules_to_save copy wins, as in peft
                adapter.head, adapter.head_source = tensor, f"{file.name}:{key}"
        else:
            raise ConversionError(
                f"{file}: unknown key {key!r} (after the reference loader's renaming; align2 "
                f"knows model.mm_projector.{{0,2}}.{{weight,bias}} and {SCORE_KEY})"
            )


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in float32 (the caller casts to the output dtype)."""
    return weight.float() + scaling * (b.float() @ a.float())
