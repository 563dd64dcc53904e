"""Offline builders of the paper's release format: original-LLaVA bases and PEFT adapters.

The released reward models cannot be downloaded here, so tests build tiny stand-ins in the
same layout (see llava_original for the facts and their sources in the reference code):

- :func:`build_clip_tower`: a CLIP folder as ``mm_vision_tower`` names one (``CLIPConfig``
  with both halves, ``vision_model.*`` and ``text_model.*`` weights, an openai-style
  ``preprocessor_config.json``);
- :func:`build_original_base`: an original-LLaVA base (Llama config plus ``mm_*`` keys,
  ``model_type`` "llava" as in llava-v1.5-7b; ``model.layers.N.*``, ``model.mm_projector.{0,2}``,
  ``lm_head``; ``.bin`` shards with an index; a tokenizer without ``<image>``);
- :func:`build_reward_adapter`: a reward adapter written the way the reference trainer
  writes one, with peft itself: ``get_peft_model(task_type="SEQ_CLS")`` over the reference's
  model structure (``model`` + ``model.mm_projector`` + ``score``), then
  ``save_pretrained(state_dict=lora_ and modules_to_save params)`` and
  ``non_lora_trainables.bin`` (the other trainable params: the projector).

Weights are random from a seed; LoRA ``B`` is random too (peft starts it at zero), so every
merged weight differs from the base.
"""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)

from align2.server.models.builders import empty_dir, llama_config, seeded
from align2.server.models.sentencepiece_merges import model_proto
from align2.server.models.tokenizers import CORPUS, build_tokenizer

LLM_LINEAR: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""What the reference's ``find_all_linear_names`` returns for a LLaVA-Llama reward model."""

_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_clip_tower(
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 3,
    heads: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    with_weights: bool = True,
) -> pathlib.Path:
    """A tiny CLIP folder (``model.safetensors`` unless ``with_weights`` is False: then the
    base must hold the tower). ``path`` must be missing or empty. Returns ``path``."""
    folder = empty_dir(path)
    vision = {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": "quick_gelu",
    }
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1}
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=hidden)
    config.save_pretrained(folder)
    if with_weights:
        save_file(clip_state(config, seed), str(folder / "model.safetensors"))
    preprocessor = {  # the layout of openai/clip-vit-large-patch14-336's file
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "resample": 3,
        "size": image_size,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return folder


def clip_state(config: CLIPConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random CLIPModel's weights (``vision_model.*``, ``text_model.*``, projections)."""
    with seeded(seed):
        model = CLIPModel(config)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def build_original_base(
    path: str | pathlib.Path,
    clip: pathlib.Path,
    *,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    vocab_size: int = 512,
    select_layer: int = -2,
    vision_tower_name: str = "align2-tiny/clip-vision",
    tower_in_base: bool = False,
    tower_seed: int = 0,
    rotary_buffers: bool = False,
    shards: int = 2,
    tokenizer: Literal["bpe", "sentencepiece"] = "bpe",
) -> pathlib.Path:
    """A tiny original-LLaVA base over the CLIP folder ``clip`` (sizes the projector).

    ``tokenizer``: the byte-level BPE of the other tiny models, or a Llama-style
    SentencePiece ``tokenizer.model`` with llava-v1.5-7b's ``tokenizer_config.json``
    (``LlamaTokenizer``, ``"legacy": false``), whose dummy prefix makes the ids after
    ``<image>`` depend on how the text is split (see llava_tokenizer).

    ``vision_tower_name`` is written as ``mm_vision_tower`` (a hub id, as in the release;
    pass the CLIP folder's path to have the converter find it by itself).
    ``tower_in_base``: also store a tower as ``model.vision_tower.vision_tower.vision_model.*``
    (the one :func:`build_clip_tower` writes with seed ``tower_seed``).
    ``rotary_buffers``: also store ``rotary_emb.inv_freq`` buffers, as older checkpoints do.
    ``path`` must be missing or empty. Returns ``path``.
    """
    folder = empty_dir(path)
    clip_config = CLIPConfig.from_pretrained(clip)
    mm_hidden = int(CLIPVisionConfig.from_pretrained(clip).hidden_size)
    if tokenizer == "sentencepiece":
        text_tokenizer = sentencepiece_tokenizer(folder, vocab_size)
    else:
        text_tokenizer = build_tokenizer((), vocab_size=vocab_size, model_max_length=2048)
        text_tokenizer.chat_template = None
        text_tokenizer.save_pretrained(folder)
    llama = llama_config(text_tokenizer, text_hidden, text_layers, text_heads, None, 4096)
    with seeded(seed):
        model = LlamaForCausalLM(llama)
        model.model.add_module("mm_projector", _projector(mm_hidden, text_hidden))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if rotary_buffers:
        head_dim = text_hidden // text_heads
        inv_freq = 1.0 / 1e4 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        for layer in range(text_layers):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    if tower_in_base:
        tower = clip_state(clip_config, tower_seed)
        for key, value in tower.items():
            if key.startswith("vision_model."):
                state[f"model.vision_tower.vision_tower.{key}"] = value
    _save_bin_shards(state, folder, shards)
    config = original_config(llama, mm_hidden, select_layer, vision_tower_name)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def sentencepiece_tokenizer(
    folder: pathlib.Path, vocab_size: int, *, whitespace_pieces: bool = False
) -> PreTrainedTokenizerBase:
    """Train a Llama-style SentencePiece BPE (byte fallback, dummy prefix, no normalisation)
    on the tiny corpus, write it as llava-v1.5-7b ships its tokenizer, and load it back.

    ``whitespace_pieces``: also put Llama's whitespace-only pieces (``"▁▁"``, ``"▁▁▁"``,
    ``"▁▁▁▁"``) right after the byte pieces with a score of -1e9, as Llama's
    ``tokenizer.model`` has them (``"▁▁"`` is id 259): the pieces whose merge order tells a
    score-ordered BPE (SentencePiece's) from an id-ordered one."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.strip().splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    written = model.getvalue()
    (folder / "tokenizer.model").write_bytes(
        _with_whitespace_pieces(written) if whitespace_pieces else written
    )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _with_whitespace_pieces(model: bytes) -> bytes:
    proto = model_proto(model)
    piece = type(proto).SentencePiece
    after_bytes = 1 + max(i for i, p in enumerate(proto.pieces) if p.type == piece.BYTE)
    for offset, text in enumerate(("▁▁", "▁▁▁▁", "▁▁▁")):
        proto.pieces.insert(after_bytes + offset, piece(piece=text, score=-1e9, type=piece.NORMAL))
    return proto.SerializeToString()


def original_config(
    llama: LlamaConfig, mm_hidden: int, select_layer: int, vision_tower: str
) -> dict[str, Any]:
    """An original-LLaVA config.json (the keys of llava-v1.5-7b's)."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": llama.bos_token_id,
        "eos_token_id": llama.eos_token_id,
        "pad_token_id": llama.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": llama.hidden_size,
        "intermediate_size": llama.intermediate_size,
        "num_hidden_layers": llama.num_hidden_layers,
        "num_attention_heads": llama.num_attention_heads,
        "num_key_value_heads": llama.num_key_value_heads,
        "max_position_embeddings": llama.max_position_embeddings,
        "rms_norm_eps": llama.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "vocab_size": llama.vocab_size,
        "torch_dtype": "float32",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": mm_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": select_layer,
        "mm_vision_tower": vision_tower,
        "use_mm_proj": True,
    }


def build_reward_adapter(
    path: str | pathlib.Path,
    base: pathlib.Path,
    *,
    seed: int = 1,
    r: int = 8,
    lora_alpha: int = 16,
    use_rslora: bool = False,
    target_modules: Sequence[str] = LLM_LINEAR,
    safe_serialization: bool = True,
    head_in: Literal["adapter", "non_lora"] = "adapter",
) -> pathlib.Path:
    """A reward adapter for ``base`` as the reference trainer saves one (see the module doc).

    ``head_in="non_lora"`` puts the head in ``non_lora_trainables.bin`` instead (a layout
    the converter also accepts). ``path`` must be missing or empty. Returns ``path``.
    """
    from peft import LoraConfig, get_peft_model

    folder = empty_dir(path)
    config = json.loads((base / "config.json").read_text())
    llama = LlamaConfig(**{k: config[k] for k in _LLAMA_KEYS})
    llama.num_labels = 1
    with seeded(seed):
        model = LlamaForSequenceClassification(llama)
        model.model.add_module(
            "mm_projector", _projector(config["mm_hidden_size"], config["hidden_size"])
        )
        lora = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            lora_dropout=0.05,
            bias="none",
            task_type="SEQ_CLS",
            use_rslora=use_rslora,
        )
        peft_model = get_peft_model(model, lora)
        _randomise_trained(peft_model, config["hidden_size"])
    projector: torch.nn.Module = getattr(model.model, "mm_projector")  # noqa: B009 (untyped)
    for param in projector.parameters():
        param.requires_grad = True  # the reference's initialize_vision_modules does this
    named = list(peft_model.named_parameters())
    saved = {k: t.detach() for k, t in named if "lora_" in k or "modules_to_save" in k}
    non_lora = {
        k: t.detach().clone()
        for k, t in named
        if "lora_" not in k and "modules_to_save" not in k and t.requires_grad
    }
    peft_model.save_pretrained(str(folder), state_dict=saved, safe_serialization=safe_serialization)
    if head_in == "non_lora":
        non_lora[_HEAD] = _move_head_out(folder, safe_serialization)
    torch.save(non_lora, folder / "non_lora_trainables.bin")
    trained = config | {
        "architectures": ["LlavaLlamaModelForSequenceClassification"],
        "model_type": "llava_llama",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
    (folder / "config.json").write_text(json.dumps(trained, indent=2, sort_keys=True) + "\n")
    return folder


_HEAD = "base_model.model.score.weight"


def _move_head_out(folder: pathlib.Path, safe: bool) -> torch.Tensor:
    """Take the head out of the adapter weights peft wrote (peft always saves a
    modules_to_save module); returns it."""
    if safe:
        weights = load_file(folder / "adapter_model.safetensors")
        head = weights.pop(_HEAD)
        save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        weights = torch.load(folder / "adapter_model.bin", weights_only=True)
        head = weights.pop(_HEAD)
        torch.save(weights, folder / "adapter_model.bin")
    return head.clone()


def _projector(mm_hidden: int, hidden: int) -> torch.nn.Sequential:
    """mlp2x_gelu: keys ``0`` and ``2`` (the GELU has none)."""
    return torch.nn.Sequential(
        torch.nn.Linear(mm_hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
    )


def _randomise_trained(model: torch.nn.Module, hidden: int) -> None:
    """Stand-ins for training: LoRA B (zero at init) and the head drawn from the seeded RNG,
    sized so that each merged delta is comparable to the base weight it changes."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
            elif "modules_to_save" in name:
                param.normal_(0.0, hidden**-0.5)


def _save_bin_shards(state: dict[str, torch.Tensor], folder: pathlib.Path, shards: int) -> None:
    """``pytorch_model-0000i-of-0000n.bin`` files and their index, as llava-v1.5-7b ships."""
    keys = list(state)
    size = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i * size : (i + 1) * size]}
        torch.save(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_base_over_llama(
    path: str | pathlib.Path,
    llama: pathlib.Path,
    clip: pathlib.Path,
    *,
    seed: int,
    select_layer: int = -2,
    vision_tower_name: str = "align2-embedded/clip-vision",
) -> pathlib.Path:
    """An original-LLaVA base whose language model is the Llama checkpoint in ``llama`` (its
    weights and tokenizer as they are, the LM head untied into its own copy as llava-v1.5-7b
    stores it) over the CLIP folder ``clip``.

    The projector's first layer is drawn from ``seed``; its second layer is all zeros, so
    every image becomes the same zero embeddings: a model built this way judges the text
    only, and gives the same score whatever the image (no vision weights exist offline, and
    a random tower would only add noise that training never saw). ``path`` must be missing
    or empty. Returns ``path``.
    """
    folder = empty_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(llama, local_files_only=True)
    tokenizer.save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(llama, local_files_only=True)
    dtype = next(model.parameters()).dtype
    mm_hidden = int(CLIPVisionConfig.from_pretrained(clip).hidden_size)
    hidden = int(model.config.hidden_size)
    with seeded(seed):
        projector = _projector(mm_hidden, hidden)
    last = cast(torch.nn.Linear, projector[2])
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # untied: its own tensor
    for key, value in projector.state_dict().items():
        state[f"model.mm_projector.{key}"] = value.to(dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = original_config(model.config, mm_hidden, select_layer, vision_tower_name)
    rope = model.config.rope_parameters or {}
    config |= {
        "rope_theta": rope.get("rope_theta", 1e4),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
