"""One original-LLaVA base in memory for several reward adapters (the paper's two heads).

The released question and answer reward models are two LoRA adapters over the same
``llava-v1.5-7b``, each with its own projector and score head. Merging each adapter into
its own copy (``convert_reward``, the reference loader) holds the 7B base twice. Here the
base is assembled once, unmerged, and each adapter is attached to it by name:

- its LoRA becomes a named PEFT adapter of the language model
  (``peft.functional.inject_adapter_in_model``; each layer then computes
  ``W x + scaling * B (A x)``, the reference's unmerged forward);
- its projector is a separate module (the base's own projector when the adapter has none,
  shared, not copied), and its head a ``[1, hidden]`` tensor.

The vision tower, the embeddings and every base weight exist once. Which adapter a forward
uses is chosen per batch by the backend (backends/shared_scoring.py).

Inputs are read and checked exactly as the conversion reads them (reward_inputs.locate,
llava_original.read_adapter: the same refusals, naming file and key); in addition the
adapters must describe the same model (their ``config.json`` give one LlavaConfig), since
they share it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pathlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig
from peft.functional import inject_adapter_in_model
from transformers import CLIPVisionConfig, LlavaModel, LlavaProcessor

from align2.server.models import llava_original as orig
from align2.server.models.convert_reward import adapter_head, assemble, llava_config
from align2.server.models.llava_original import ConversionError
from align2.server.models.reward_inputs import Inputs, input_digests, locate


@dataclass(frozen=True)
class HeadInputs:
    """One reward adapter over the shared base, located and read (weights in memory)."""

    inputs: Inputs
    adapter: orig.Adapter


def read_head(base: pathlib.Path, adapter: pathlib.Path, tower: pathlib.Path | None) -> HeadInputs:
    """Locate and read one adapter as ``convert-reward`` does; raises ConversionError."""
    inputs = locate(base, adapter, tower)
    return HeadInputs(inputs, orig.read_adapter(inputs.adapter))


@dataclass
class Head:
    """What one reward model adds to the shared base."""

    adapter_name: str
    """The PEFT adapter name of its LoRA in the language model."""
    projector: torch.nn.Module
    """Its mlp2x_gelu projector (the base's own module when the adapter has none)."""
    weight: torch.Tensor
    """The score head ``[1, hidden]``, as stored."""
    model_id: str
    """The adapter folder's name."""
    revision: str
    """A short sha256 over every input file (base, adapter, vision tower)."""


@dataclass
class SharedLlava:
    """The base (no LM head: a score never reads it) with every head's LoRA injected."""

    model: LlavaModel
    processor: LlavaProcessor
    heads: dict[str, Head]
    """By config name (the server's model name), in the order given."""


def build_shared(heads: Mapping[str, HeadInputs], dtype: torch.dtype) -> SharedLlava:
    """Assemble the base once in ``dtype`` and attach every head; raises ConversionError
    when the adapters do not describe the same model."""
    if not heads:
        raise ValueError("build_shared needs at least one head")
    first = next(iter(heads.values()))
    # The base alone: nothing merged, the base's own projector.
    bare = dataclasses.replace(first.adapter, lora={}, projector={})
    built = assemble(first.inputs, bare, dtype)
    model, processor = built.model.model, built.processor
    del built  # and with it the LM head: a score never reads it
    _compute_buffers(model)
    for name, head in heads.items():
        _check_same_model(name, head, first, processor)
    base_projector = model.multi_modal_projector
    attached: dict[str, Head] = {}
    for index, (name, head) in enumerate(heads.items()):
        adapter_name = f"head{index}"  # config names may hold dots, PEFT names may not
        _inject_lora(model.language_model, adapter_name, head.adapter, dtype)
        attached[name] = Head(
            adapter_name=adapter_name,
            projector=_projector(base_projector, head.adapter, dtype),
            weight=adapter_head(head.adapter, int(model.config.text_config.hidden_size)),
            model_id=head.inputs.adapter.name,
            revision=_revision(head.inputs),
        )
    if all(h.projector is not base_projector for h in attached.values()):
        model.multi_modal_projector = None  # every head brings its own: free the base's
    # What from_pretrained picks by default, so that both modes compute attention alike (a
    # model built directly leaves the vision tower's unset, which runs eager; setting it on
    # the LlavaModel alone does not reach the tower).
    for part in (model, model.vision_tower, model.language_model):
        part.set_attn_implementation("sdpa")
    model.requires_grad_(False)
    model.eval()
    if any(p.is_meta for p in model.parameters()):
        raise ConversionError("internal: a weight of the shared base was never loaded")
    return SharedLlava(model, processor, attached)


def _compute_buffers(model: torch.nn.Module) -> None:
    """Fill the buffers that a model computes in ``__init__`` rather than loads (rotary
    ``inv_freq``, CLIP ``position_ids``): the assembly on the meta device left them empty
    (saving skips them, so the conversion never needed them). Each comes from a fresh module
    of the same class and config, which is small (a rotary embedding, CLIP's embeddings)."""
    for name, module in model.named_modules():
        empty = [k for k, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not empty:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ConversionError(f"internal: cannot compute the buffers {empty} of {name}")
        fresh = type(module)(config)
        for key in empty:  # non-persistent all: a persistent one was loaded (strict)
            module.register_buffer(key, getattr(fresh, key), persistent=False)


def _check_same_model(
    name: str, head: HeadInputs, first: HeadInputs, processor: LlavaProcessor
) -> None:
    """The model this adapter was trained as must be the shared one."""
    if head.inputs.base.folder.resolve() != first.inputs.base.folder.resolve():
        raise ConversionError(f"{name}: base {head.inputs.base.folder} is not the shared base")
    if head.inputs.tower.folder.resolve() != first.inputs.tower.folder.resolve():
        raise ConversionError(
            f"{name}: vision tower {head.inputs.tower.folder} differs from "
            f"{first.inputs.tower.folder}"
        )

    def described(h: HeadInputs) -> dict[str, Any]:
        # A fresh vision config each: a LlavaConfig built over one may change its settings.
        vision = CLIPVisionConfig.from_pretrained(h.inputs.tower.folder)
        return llava_config(h.inputs.model_config, vision, processor.tokenizer).to_dict()

    own, shared = described(head), described(first)
    differ = sorted(k for k in own.keys() | shared.keys() if own.get(k) != shared.get(k))
    if differ:
        raise ConversionError(
            f"{head.inputs.adapter}/config.json describes another model than "
            f"{first.inputs.adapter.name}'s ({', '.join(differ)} differ): the two cannot "
            "share one base"
        )


def _inject_lora(
    language_model: torch.nn.Module, adapter_name: str, adapter: orig.Adapter, dtype: torch.dtype
) -> None:
    """Add ``adapter``'s LoRA to ``language_model`` as PEFT adapter ``adapter_name``, with
    its own weights (nothing random: the layers are created on the meta device, then given
    the adapter's tensors)."""
    # Original names are model.layers.N...; the HF language model's are layers.N...
    modules = {name.removeprefix("model."): pair for name, pair in adapter.lora.items()}
    config = LoraConfig(
        r=adapter.peft_config["r"],
        lora_alpha=adapter.peft_config["lora_alpha"],
        use_rslora=bool(adapter.peft_config.get("use_rslora")),
        target_modules=sorted(modules),  # exact module paths: only the layers it adapts
        lora_dropout=0.0,
        bias="none",
    )
    with warnings.catch_warnings():  # "multiple adapters in the model": what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, language_model, adapter_name, low_cpu_mem_usage=True)
    for module_name, (a, b) in modules.items():
        layer: Any = language_model.get_submodule(module_name)  # a peft LoRA layer now
        for part, tensor in (("lora_A", a), ("lora_B", b)):
            linear = getattr(layer, part)[adapter_name]
            if tuple(linear.weight.shape) != tuple(tensor.shape):
                raise ConversionError(
                    f"{adapter.folder.name}: shape mismatch at {module_name}.{part}: "
                    f"{list(tensor.shape)}, the layer needs {list(linear.weight.shape)}"
                )
            # A copy: a .bin adapter's tensors are mapped from its file.
            owned = tensor.to(dtype, memory_format=torch.contiguous_format, copy=True)
            linear.weight = torch.nn.Parameter(owned, requires_grad=False)
        if layer.scaling[adapter_name] != adapter.scaling:
            raise ConversionError(
                f"{adapter.folder.name}: PEFT scales {module_name} by "
                f"{layer.scaling[adapter_name]}, the adapter config says {adapter.scaling}"
            )


def _projector(
    base_projector: torch.nn.Module, adapter: orig.Adapter, dtype: torch.dtype
) -> torch.nn.Module:
    """The adapter's projector: the base's with the adapter's tensors in place of its own
    (every one of them in the release; the base's module itself when there are none)."""
    if not adapter.projector:
        return base_projector
    projector = copy.deepcopy(base_projector)
    state: dict[str, Any] = {}
    for key, tensor in adapter.projector.items():
        name = orig.hf_name(key)
        assert name is not None and name.startswith(orig.HF_PROJECTOR)
        state[name.removeprefix(orig.HF_PROJECTOR)] = tensor.to(dtype)
    try:
        projector.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ConversionError(f"{adapter.folder.name}/non_lora_trainables.bin: {exc}") from exc
    return projector


def _revision(inputs: Inputs) -> str:
    digests = input_digests(inputs)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:12]
