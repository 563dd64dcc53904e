"""The tokenizer of a converted original-LLaVA reward model: the ids its training saw.

The original code never tokenises ``<image>``: LLaVA's ``tokenizer_image_token``
(haotian-liu/LLaVA ``llava/mm_utils.py``) splits the prompt at the marker string, tokenises
each chunk on its own and drops the BOS of every chunk after the first. A SentencePiece
(Llama) tokenizer therefore puts its dummy prefix ``▁`` at the start of the text after the
image: ``<image>\\nQuestion`` becomes ``BOS, IMAGE, ▁, <0x0A>, Question...`` (the familiar
``29871, 13`` of LLaVA-1.5 prompts).

An HF processor instead tokenises the whole text with ``<image>`` as one added token. A
Llama tokenizer with ``"legacy": false`` (llava-v1.5-7b's setting) adds the prefix only at
the very start, so the ``▁`` after the image would be missing and every score would be of
an input the reward model never saw. :func:`reward_tokenizer` checks the split on the
templates' shapes and, where it differs, switches the tokenizer to ``legacy`` (SentencePiece
prefix after every added token), which gives the chunk-wise ids; :func:`splits_like_llava`
is checked again on the saved folder. The tokenizer class is the one
``tokenizer_config.json`` names, as transformers 4 loaded it in training: transformers 5's
AutoTokenizer, led by the base's ``model_type`` "llava", would load a generic tokenizer
without any SentencePiece prefix.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from align2.server.formats import IMAGE_TOKEN
from align2.server.models.llava_original import ConversionError
from align2.server.models.sentencepiece_merges import with_score_ordered_merges
from align2.server.models.tokenizers import strip_load_options

# What follows the marker in the two reward templates (question and answer head).
_PROBES = ("\nWhat is on the table?\nWhy is it there?", "\nQuestion: What is it?\nAnswer: A cup.")


def reward_tokenizer(base: pathlib.Path) -> tuple[PreTrainedTokenizerBase, str]:
    """The base's tokenizer with ``<image>`` added (one special token, for the HF processor),
    the reference training's pad token (``unk``) when it has none, and the chunk-wise split.

    Returns the tokenizer and what was changed for the split (provenance). Raises
    ConversionError when no setting reproduces ``tokenizer_image_token``'s ids.
    """
    tokenizer = _load(base)
    if splits_like_llava(tokenizer):
        return tokenizer, "as the base's"
    tokenizer = _load(base, legacy=True)
    # Saved with the tokenizer so that a reload keeps the SentencePiece prefix after <image>.
    tokenizer.legacy = True
    tokenizer.init_kwargs["legacy"] = True
    if not splits_like_llava(tokenizer):
        raise ConversionError(
            f"{base}: its tokenizer does not tokenise the text after <image> as LLaVA's "
            "tokenizer_image_token does (chunk by chunk), with or without legacy=True"
        )
    return tokenizer, "legacy=True: SentencePiece prefix after <image>, as chunk-wise"


def splits_like_llava(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the ids after ``<image>`` in one string equal the text tokenised alone."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for text in _PROBES:
        whole = list(tokenizer(IMAGE_TOKEN + text)["input_ids"])
        alone = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if image_id not in whole or whole[whole.index(image_id) + 1 :] != alone:
            return False
    return True


def _load(base: pathlib.Path, *, legacy: bool | None = None) -> PreTrainedTokenizerBase:
    """The class ``tokenizer_config.json`` names, as transformers 4 loaded it for training
    (``AutoTokenizer(use_fast=False)``). transformers 5's AutoTokenizer would follow the
    base's ``config.json`` ``model_type`` "llava" to a generic backend that drops the
    SentencePiece prefix altogether."""
    named = _named_class(base)
    options: dict[str, Any] = {} if legacy is None else {"legacy": legacy}
    tokenizer = with_score_ordered_merges(
        named.from_pretrained(base, local_files_only=True, **options), base
    )
    strip_load_options(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def _named_class(base: pathlib.Path) -> type[PreTrainedTokenizerBase] | type[AutoTokenizer]:
    config = base / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    named = getattr(transformers, str(name), None) if name else None
    if isinstance(named, type) and issubclass(named, PreTrainedTokenizerBase):
        return named
    return AutoTokenizer
