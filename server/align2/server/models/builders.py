"""Offline builders of complete Hugging Face model folders for both reward families.

No model hub is reachable, so tests, benchmarks and the embedded defaults build their
models here. Contract of every builder:

- it writes a folder that ``AutoProcessor.from_pretrained`` and
  ``AutoModelForImageTextToText.from_pretrained`` load (and vLLM, for Idefics3): config,
  safetensors weights, tokenizer, image processor, processor config and chat template;
- the folder is byte-identical when rebuilt with the same arguments (and the same library
  versions): weights come from a seeded RNG and nothing time- or path-dependent is saved;
- a **reward checkpoint** (``with_score_head=True``) is the VLM plus a scalar head: the
  top-level ``config.json`` says ``"num_labels": 1`` and the weights hold ``score.weight``
  of shape ``[1, text_hidden]``, the layout vLLM's ``runner="pooling", convert="classify"``
  loads. transformers ignores the extra key (its load report lists it as unexpected); the
  score is ``hidden_state[last non-padding token] @ score.weight.T``.

The head is untrained: its std is ``1 / ||final_norm.weight||``, so that a score (a sum over
the hidden size of normalised states times that norm's gain) is O(1) whatever the sizes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import pathlib
from collections.abc import Iterator
from typing import TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)

from align2.server.formats import SCORE_KEY
from align2.server.models.tokenizers import (
    CHAT_TEMPLATE,
    IDEFICS3_SPECIAL_TOKENS,
    LLAVA_SPECIAL_TOKENS,
    build_tokenizer,
    strip_load_options,
)

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=PreTrainedModel)


def llava_image_tokens(image_size: int, patch_size: int) -> int:
    """Tokens one image takes in LLaVA ("default" strategy drops CLS): 336/14 -> 576."""
    return (image_size // patch_size) ** 2


def idefics3_image_tokens(image_size: int, patch_size: int, scale_factor: int) -> int:
    """``<image>`` tokens per image tile in Idefics3 (pixel shuffle): 512/16/4 -> 64.

    An unsplit image takes these plus 3 more (two ``<fake_token_around_image>`` and
    ``<global-img>``).
    """
    return (image_size // patch_size) ** 2 // scale_factor**2


def build_llava_reward(
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    text_intermediate: int | None = None,
    vocab_size: int = 512,
    max_length: int = 2048,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    image_size: int = 336,
    patch_size: int = 14,
    with_score_head: bool = True,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> pathlib.Path:
    """Write a random LLaVA-1.5-shaped model (reward checkpoint by default) to ``path``.

    Llama text half, CLIP vision tower read at its second-to-last layer, patch features
    only ("default" strategy), two-layer GELU projector; CLIP preprocessing (resize the
    shortest edge, centre crop, CLIP mean/std). ``<image>`` expands to
    :func:`llava_image_tokens` tokens. ``*_intermediate`` default to 4x the hidden size.
    ``tokenizer``: one to use instead of the tiny BPE (e.g. a Llama SentencePiece one from
    :func:`~align2.server.models.tokenizers.llama_tokenizer`); it must know ``<image>``,
    and ``vocab_size`` is then ignored. ``path`` must be missing or empty. Returns ``path``.
    """
    if vision_layers < 2:
        raise ValueError("vision_layers must be at least 2 (features come from layer -2)")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    folder = empty_dir(path)
    if tokenizer is None:
        tokenizer = build_tokenizer(
            LLAVA_SPECIAL_TOKENS, vocab_size=vocab_size, model_max_length=max_length
        )
    n_image = llava_image_tokens(image_size, patch_size)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",  # CLIP ViT-L/14's activation
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama_config(
            tokenizer, text_hidden, text_layers, text_heads, text_intermediate, max_length
        ),
        image_token_index=_token_id(tokenizer, "<image>"),
        image_seq_length=n_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        # The CLS token the "default" strategy drops; the processor subtracts it again.
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model = _seeded_model(LlavaForConditionalGeneration, config, seed, dtype)
    _save(model, processor, folder, seed if with_score_head else None)
    return folder


def build_idefics3_reward(
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    text_intermediate: int | None = None,
    vocab_size: int = 512,
    max_length: int = 2048,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    image_size: int = 512,
    patch_size: int = 16,
    scale_factor: int = 4,
    do_image_splitting: bool = False,
    with_score_head: bool = True,
    text_model_from: str | pathlib.Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> pathlib.Path:
    """Write a random Idefics3 / SmolVLM-shaped model (reward checkpoint by default).

    SigLIP-style vision tower, pixel-shuffle connector (``scale_factor``), Llama text half.
    Defaults follow SmolVLM: 512 px images, 16 px patches, scale factor 4, so one image is
    :func:`idefics3_image_tokens` = 64 ``<image>`` tokens (+3 markers). Without splitting
    every image is resized to ``image_size`` square; with it, large images also yield up
    to 4x4 tiles of that size.

    ``text_model_from``: a Llama causal-LM folder whose text model, LM head and tokenizer
    are used (with the 4 Idefics3 tokens added) instead of a random text half; the
    ``text_*``, ``vocab_size`` and ``max_length`` arguments are then ignored.
    ``path`` must be missing or empty. Returns ``path``.
    """
    if image_size % patch_size or (image_size // patch_size) % scale_factor:
        raise ValueError(
            f"image_size/patch_size ({image_size}/{patch_size}) must be a whole number "
            f"divisible by scale_factor {scale_factor}"
        )
    folder = empty_dir(path)
    source: PreTrainedModel | None = None
    tokenizer: PreTrainedTokenizerBase
    text: PreTrainedConfig
    if text_model_from is None:
        tokenizer = build_tokenizer(
            IDEFICS3_SPECIAL_TOKENS, vocab_size=vocab_size, model_max_length=max_length
        )
        text = llama_config(
            tokenizer, text_hidden, text_layers, text_heads, text_intermediate, max_length
        )
    else:
        source, tokenizer, text = _load_text_model(pathlib.Path(text_model_from), dtype)
    vision = Idefics3VisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=_token_id(tokenizer, "<image>"),
        pad_token_id=tokenizer.pad_token_id,
        # transformers ties by the top-level flag, vLLM by the text config's: keep them equal.
        tie_word_embeddings=text.tie_word_embeddings,
    )
    processor = Idefics3Processor(
        image_processor=_idefics3_image_processor(image_size, do_image_splitting),
        tokenizer=tokenizer,
        image_seq_len=idefics3_image_tokens(image_size, patch_size, scale_factor),
        chat_template=CHAT_TEMPLATE if text_model_from is None else tokenizer.chat_template,
    )
    model = _seeded_model(Idefics3ForConditionalGeneration, config, seed, dtype)
    if source is not None:
        _graft_text_model(model, source)
    _save(model, processor, folder, seed if with_score_head else None)
    return folder


def build_llama_causal_lm(
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 512,
    max_length: int = 2048,
    chat_template: bool = True,
    dtype: torch.dtype = torch.float32,
) -> pathlib.Path:
    """Write a random Llama causal LM (a tiny inner LLM for generation tests) to ``path``.

    The tiny BPE tokenizer with its ChatML template (EOS ``<|im_end|>`` ends a reply);
    ``chat_template=False`` saves none, as Vicuna checkpoints do. ``path`` must be missing
    or empty. Returns ``path``.
    """
    folder = empty_dir(path)
    tokenizer = build_tokenizer((), vocab_size=vocab_size, model_max_length=max_length)
    if not chat_template:
        tokenizer.chat_template = None
    config = llama_config(tokenizer, hidden, layers, heads, intermediate, max_length)
    model = _seeded_model(LlamaForCausalLM, config, seed, dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _idefics3_image_processor(
    image_size: int, do_image_splitting: bool
) -> Idefics3ImageProcessorPil:
    """SmolVLM's preprocessing (LANCZOS, mean/std 0.5) for ``image_size`` tiles."""
    return Idefics3ImageProcessorPil(
        # With splitting, SmolVLM first fits the image into 4 tiles a side.
        size={"longest_edge": image_size * (4 if do_image_splitting else 1)},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=do_image_splitting,
        resample=PILImageResampling.LANCZOS,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
    )


def empty_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Create ``path`` if needed; refuse one with files (stale files would mix in)."""
    folder = pathlib.Path(path)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def llama_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None,
    max_length: int,
) -> LlamaConfig:
    """A random Llama text half sized for ``tokenizer``."""
    if hidden % heads:
        raise ValueError(f"text_hidden {hidden} is not a multiple of text_heads {heads}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_length,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for the block, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _seeded_model(cls: type[_M], config: PreTrainedConfig, seed: int, dtype: torch.dtype) -> _M:
    """Instantiate ``cls`` on CPU with weights drawn from ``seed``, cast to ``dtype``."""
    with seeded(seed):
        model = cls(config)
    # transformers wraps ``to`` with functools.wraps, which hides the bound self from mypy.
    torch.nn.Module.to(model, dtype)
    return model.eval()


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single token that must be in the vocabulary."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
    return token_id


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (embedding / linear layers)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def _load_text_model(
    folder: pathlib.Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PreTrainedConfig]:
    """Load a Llama causal LM and its tokenizer, with the Idefics3 tokens added.

    Returns the model, the tokenizer and a portable copy of the model's config (the text
    config to embed). New embedding rows are the mean of the existing ones (deterministic,
    and a neutral start for tokens the text model never saw).
    """
    tokenizer = AutoTokenizer.from_pretrained(folder)
    strip_load_options(tokenizer)
    missing = [t for t in IDEFICS3_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if model.config.model_type != "llama":
        raise ValueError(
            f"{folder}: text_model_from needs a llama model, got {model.config.model_type}"
        )
    old = _weight(model.get_input_embeddings()).shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            embeddings = _weight(model.get_input_embeddings())
            embeddings[old:] = embeddings[:old].mean(dim=0)
            output = model.get_output_embeddings()
            if output is not None and not model.config.tie_word_embeddings:
                head = _weight(output)
                head[old:] = head[:old].mean(dim=0)
    return model, tokenizer, _portable_config(model.config)


def _portable_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of a loaded config without the folder it came from (a machine-specific path
    that would otherwise be saved inside the nested ``text_config``)."""
    portable = copy.deepcopy(config)
    portable._name_or_path = ""
    return portable


def _graft_text_model(model: PreTrainedModel, source: PreTrainedModel) -> None:
    """Copy ``source``'s decoder and LM head into the Idefics3 ``model`` (strict)."""
    with torch.no_grad():
        model.model.text_model.load_state_dict(source.model.state_dict(), strict=True)
        model.lm_head.weight.copy_(source.lm_head.weight)
    if model.config.tie_word_embeddings:
        model.tie_weights()


def _score_weight(model: PreTrainedModel, seed: int) -> torch.Tensor:
    """The untrained head ``[1, hidden]``: N(0, 1/||final_norm.weight||^2), own RNG."""
    norm = model.get_decoder().norm.weight.detach().float()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn((1, norm.numel()), generator=generator) / norm.norm()
    return weight.to(model.dtype)


def _save(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    path: pathlib.Path,
    head_seed: int | None,
) -> None:
    """Write model, processor and (when ``head_seed`` is given) the score head."""
    if head_seed is not None:
        # As a top-level module attribute the head lands in the same safetensors file,
        # under the top-level key (SCORE_KEY) that vLLM's classify adapter loads.
        head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1, bias=False)
        head.weight = torch.nn.Parameter(_score_weight(model, head_seed), requires_grad=False)
        model.add_module(SCORE_KEY.removesuffix(".weight"), head)
        model.config.num_labels = 1
    model.save_pretrained(path)
    processor.save_pretrained(path)
    log.info("wrote %s (%d parameters)", path, sum(p.numel() for p in model.parameters()))
