"""Convert an original-LLaVA base + a PEFT LoRA reward adapter into an align2 reward checkpoint.

``align2 convert-reward`` and the server (a ``[models.NAME]`` with ``adapter``) both call
:func:`convert_reward`. The result is the layout every align2 reward backend loads: a
Hugging Face ``LlavaForConditionalGeneration`` folder (``vision_feature_layer`` = the base's
``mm_vision_select_layer``, strategy "default" for patch features without CLS) with
``"num_labels": 1`` and a top-level ``score.weight`` ``[1, hidden]``, its tokenizer (with an
``<image>`` token added: the original code splices at a marker string instead) and CLIP
image processor, and ``align2_provenance.json`` naming the inputs and their sha256.

Each LoRA delta is merged in float32 as ``W + scaling * B @ A`` and cast to the output dtype
(the base's own by default, fp16 for llava-v1.5-7b, as the reference's fp16 merge); the
adapter's projector and head replace the base's. Memory: the merged model in the output
dtype plus the tensors being read (``.bin`` shards are memory-mapped).

Contract: the output folder appears complete or not at all. It is written in a hidden
temporary sibling and renamed into place; any failure removes the sibling. Anything not
understood is refused with a :class:`ConversionError` naming the file and key (see
llava_original for what is read and why).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from align2.server.formats import IMAGE_TOKEN, SCORE_KEY
from align2.server.models import llava_original as orig
from align2.server.models import scratch
from align2.server.models.llava_original import ConversionError
from align2.server.models.llava_tokenizer import reward_tokenizer, splits_like_llava
from align2.server.models.reward_inputs import Inputs, input_digests, locate

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1
"""Bump when the output of a conversion changes, so that cached conversions are redone."""
PROVENANCE = "align2_provenance.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_reward(
    base: str | pathlib.Path,
    adapter: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    vision_tower: str | pathlib.Path | None = None,
    dtype: str = "auto",
) -> pathlib.Path:
    """Write the align2 reward checkpoint of ``adapter`` over ``base`` to ``out``.

    ``out`` must not exist (or be an empty folder). ``dtype``: auto (the base's) | float32
    | bfloat16 | float16. Raises ConversionError for inputs it does not understand.
    """
    inputs = locate(pathlib.Path(base), pathlib.Path(adapter), _path(vision_tower))
    return _write(inputs, pathlib.Path(out), dtype, input_digests(inputs))


def ensure_converted(
    base: pathlib.Path,
    adapter: pathlib.Path,
    vision_tower: pathlib.Path | None,
    cache_dir: pathlib.Path,
) -> pathlib.Path:
    """The cached conversion of these inputs, converting first if it is missing.

    The cache folder is keyed by the sha256 of every input file (and the converter
    version), so an edited input converts again and the same inputs never do.
    """
    inputs = locate(base, adapter, vision_tower)
    digests = input_digests(inputs)
    key = hashlib.sha256(
        json.dumps([CONVERTER_VERSION, "auto", digests], sort_keys=True).encode()
    ).hexdigest()
    target = cache_dir / "converted" / f"v{CONVERTER_VERSION}" / f"{adapter.name}-{key[:16]}"
    if (target / PROVENANCE).is_file():
        return target
    log.info("converting %s over %s into %s", adapter, base, target)
    try:
        return _write(inputs, target, "auto", digests)
    except FileExistsError:
        if (target / PROVENANCE).is_file():  # converted concurrently: identical content
            return target
        raise


# -- writing ----------------------------------------------------------------------------------
def _write(inputs: Inputs, out: pathlib.Path, dtype: str, digests: dict[str, Any]) -> pathlib.Path:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch.folder(out.name, out.parent) as building:
        try:
            _build(inputs, building, dtype, digests)
            if out.is_dir():
                out.rmdir()  # empty (checked above); rename needs the name free
            os.rename(building, out)
        except OSError as exc:
            if out.is_dir() and any(out.iterdir()):
                raise FileExistsError(f"{out} appeared while converting") from exc
            raise
    log.info("wrote reward checkpoint %s", out)
    return out


@dataclass
class Assembled:
    """A reward model's HF weights in memory, without its head (see :func:`assemble`)."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    tokenizer_note: str
    """What was changed for LLaVA's split at ``<image>`` (provenance)."""
    notes: dict[str, Any]
    """Where the projector and the vision tower came from (provenance)."""


def assemble(inputs: Inputs, adapter: orig.Adapter, dtype: torch.dtype) -> Assembled:
    """The ``LlavaForConditionalGeneration`` of ``adapter`` over the base, on the CPU in
    ``dtype``: every LoRA of ``adapter.lora`` merged, its projector (the base's where it has
    none), the CLIP tower; no score head. With ``adapter.lora`` and ``adapter.projector``
    empty this is the base alone (what a shared base serves, see backends/shared_scoring)."""
    tokenizer, tokenizer_note = reward_tokenizer(inputs.base.folder)
    vision = CLIPVisionConfig.from_pretrained(inputs.tower.folder)
    config = llava_config(inputs.model_config, vision, tokenizer)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assembly = _Assembly(model, dtype)
    notes = _assemble(assembly, inputs, adapter)
    model.load_state_dict(assembly.state, strict=True, assign=True)
    processor = _processor(inputs, tokenizer, vision, config)
    return Assembled(model, processor, tokenizer_note, notes)


def _build(inputs: Inputs, folder: pathlib.Path, dtype_name: str, digests: dict[str, Any]) -> None:
    adapter = orig.read_adapter(inputs.adapter)
    dtype = _dtype(dtype_name, inputs.base.files)
    built = assemble(inputs, adapter, dtype)
    model, config = built.model, built.model.config
    hidden = _int(config.get_text_config().hidden_size, "hidden_size")
    head = torch.nn.Linear(hidden, 1, bias=False, device="meta")
    head.weight = torch.nn.Parameter(adapter_head(adapter, hidden).to(dtype), requires_grad=False)
    model.add_module(SCORE_KEY.removesuffix(".weight"), head)
    model.config.num_labels = 1
    model.save_pretrained(folder, max_shard_size="5GB")
    built.processor.save_pretrained(folder)
    if not splits_like_llava(AutoTokenizer.from_pretrained(folder)):
        raise ConversionError(f"{folder}: the saved tokenizer lost LLaVA's split at <image>")
    provenance = {
        "format": "align2 reward checkpoint converted from original-LLaVA + PEFT LoRA",
        "converter_version": CONVERTER_VERSION,
        "align2_version": _version(),
        "inputs": digests,
        "dtype": str(dtype).removeprefix("torch."),
        "model_config_from": inputs.config_source,
        "lora": {
            "r": adapter.peft_config["r"],
            "lora_alpha": adapter.peft_config["lora_alpha"],
            "use_rslora": bool(adapter.peft_config.get("use_rslora")),
            "scaling": adapter.scaling,
            "modules_merged": len(adapter.lora),
        },
        "score_head_from": adapter.head_source,
        "tokenizer": built.tokenizer_note,
        **built.notes,
        "trained_with": {
            k: inputs.model_config.get(k)
            for k in ("image_aspect_ratio", "tokenizer_model_max_length", "mm_vision_select_layer")
        },
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


class _Assembly:
    """The HF state dict being filled: every key checked against the model's own."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.state: dict[str, torch.Tensor] = {}
        self.dtype = dtype

    def put(self, key: str, tensor: torch.Tensor, origin: str) -> None:
        if key not in self.expected:
            raise ConversionError(f"{origin}: unknown key (no {key} in a LLaVA model)")
        if tuple(tensor.shape) != self.expected[key]:
            raise ConversionError(
                f"{origin}: shape mismatch, {list(tensor.shape)} where {key} is "
                f"{list(self.expected[key])}"
            )
        if key in self.state:
            raise ConversionError(f"{origin}: {key} is given twice")
        self.state[key] = tensor.to(self.dtype).contiguous().clone()

    def missing(self) -> list[str]:
        return sorted(set(self.expected) - set(self.state))


def _assemble(assembly: _Assembly, inputs: Inputs, adapter: orig.Adapter) -> dict[str, Any]:
    """Fill ``assembly`` from the base, the adapter and the tower; returns provenance notes."""
    tower_files = inputs.tower.files
    unused_lora = set(adapter.lora)
    ignored_tower_keys = 0
    vocab = assembly.expected["lm_head.weight"][0]
    for key, tensor in orig.iter_tensors(inputs.base.files):
        name = orig.hf_name(key)
        origin = f"{inputs.base.folder.name}: {key}"
        if name is None or (name.startswith(orig.HF_PROJECTOR) and key in adapter.projector):
            continue
        if name.startswith(orig.HF_TOWER) and tower_files:
            ignored_tower_keys += 1  # the reference loads the tower from mm_vision_tower
            continue
        module = key.removesuffix(".weight")
        if module in adapter.lora:
            a, b = adapter.lora[module]
            if (b.shape[0], a.shape[1]) != tuple(tensor.shape):
                raise ConversionError(
                    f"{inputs.adapter.name}: shape mismatch at {module}: B @ A is "
                    f"{[b.shape[0], a.shape[1]]}, the base weight {list(tensor.shape)}"
                )
            tensor = orig.merged(tensor, a, b, adapter.scaling)
            unused_lora.discard(module)
        if name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            tensor = _grow_rows(tensor, vocab)
        assembly.put(name, tensor, origin)
    if unused_lora:
        raise ConversionError(
            f"{inputs.adapter.name}: LoRA on {sorted(unused_lora)[0]!r}, which the base has no "
            "weight for (an adapter for another base?)"
        )
    for key, tensor in adapter.projector.items():
        name = orig.hf_name(key)
        assert name is not None
        assembly.put(name, tensor, f"{inputs.adapter.name}/non_lora_trainables.bin: {key}")
    for key, tensor in orig.iter_tensors(tower_files):
        name = orig.clip_hf_name(key)
        if name is not None:
            assembly.put(name, tensor, f"{inputs.tower.folder.name}: {key}")
    missing = assembly.missing()
    if missing:
        raise ConversionError(
            f"missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all; none of base, adapter and vision tower holds them)"
        )
    return {
        "projector_from": "adapter" if adapter.projector else "base",
        "vision_tower_from": "vision_tower" if tower_files else "base",
        "base_vision_tower_keys_ignored": ignored_tower_keys,
    }


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Embedding rows for tokens added here (``<image>``): the mean of the existing rows.
    Never read by a score (the processor replaces ``<image>`` ids by image features)."""
    if weight.shape[0] >= rows:
        return weight
    extra = weight.float().mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra.to(weight.dtype)])


def adapter_head(adapter: orig.Adapter, hidden: int) -> torch.Tensor:
    assert adapter.head is not None
    if tuple(adapter.head.shape) != (1, hidden):
        raise ConversionError(
            f"{adapter.folder.name}: shape mismatch, score head {adapter.head_source} is "
            f"{list(adapter.head.shape)}, expected [1, {hidden}]"
        )
    return adapter.head


def llava_config(
    config: dict[str, Any], vision: CLIPVisionConfig, tokenizer: PreTrainedTokenizerBase
) -> LlavaConfig:
    """The HF config equivalent of an original-LLaVA config (defaults: those of the Llama
    config the original code was trained with where a key is absent)."""
    if config.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(
            f"shape mismatch: mm_hidden_size {config['mm_hidden_size']} but the vision tower's "
            f"hidden_size is {vision.hidden_size}"
        )
    heads = config["num_attention_heads"]
    text = LlamaConfig(
        vocab_size=max(int(config["vocab_size"]), len(tokenizer)),
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 1e4)},
        attention_bias=config.get("attention_bias", False),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    full = config.get("mm_vision_select_feature", "patch") == "cls_patch"
    patches = (_int(vision.image_size, "image_size") // _int(vision.patch_size, "patch_size")) ** 2
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(image_token, int)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=patches + int(full),
        projector_hidden_act="gelu",  # nn.GELU() of mlp2x_gelu: the exact (erf) GELU
        vision_feature_select_strategy="full" if full else "default",
        vision_feature_layer=config["mm_vision_select_layer"],
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def _processor(
    inputs: Inputs,
    tokenizer: PreTrainedTokenizerBase,
    vision: CLIPVisionConfig,
    config: LlavaConfig,
) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(inputs.tower.folder),
        tokenizer=tokenizer,
        patch_size=_int(vision.patch_size, "patch_size"),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLS, which the "default" strategy drops again
    )


def _int(value: object, name: str) -> int:
    if not isinstance(value, int):
        raise ConversionError(f"{name} must be an integer, got {value!r}")
    return value


def _dtype(name: str, files: list[pathlib.Path]) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ConversionError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
        return DTYPES[name]
    for _, tensor in orig.iter_tensors(files):
        if tensor.is_floating_point():
            return tensor.dtype
    raise ConversionError(f"{files[0].parent}: no floating-point weights")


def _path(value: str | pathlib.Path | None) -> pathlib.Path | None:
    return None if value in (None, "") else pathlib.Path(str(value)).expanduser()


def _version() -> str:
    try:
        return importlib.metadata.version("align2")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
