"""Tokenizers of SentencePiece BPE checkpoints, with SentencePiece's own split.

Vicuna-7B-v1.5 (the inner LLM of LLaVA-1.5) and llava-v1.5-7b ship their tokenizer as a
bare SentencePiece ``tokenizer.model``, without a ``tokenizer.json``. The reference loads
it with SentencePiece itself (``AutoTokenizer(use_fast=False)`` in transformers 4), and
SentencePiece applies a BPE model's merges in the order of the pieces' scores.

transformers 5 converts such a file into a ``tokenizers`` BPE whose merges are ordered by
piece id instead (its ``SentencePieceExtractor.extract`` calls ``generate_merges(vocab)``
without the scores; transformers 4's ``LlamaConverter``, which wrote every Llama
``tokenizer.json`` in use, passed them). The two orders differ for Llama's whitespace-only
pieces, which sit at low ids with a score of -1e9 (``"▁▁"`` is id 259): ``"a  b"`` becomes
``["▁a", "▁▁", "b"]`` where SentencePiece gives ``["▁a", "▁", "▁b"]``. Every text with a
run of spaces would then reach the model as ids it never saw in training.

:func:`load_tokenizer` and :func:`with_score_ordered_merges` put the merges back in score
order (transformers' own ``generate_merges`` with the scores, as transformers 4 called it).
A folder with a ``tokenizer.json`` is left as it is: that file holds its merges as written.
"""

from __future__ import annotations

import pathlib
from typing import Any, TypeVar

from tokenizers import models
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import import_protobuf
from transformers.tokenization_utils_base import generate_merges

_BPE = 2  # sentencepiece_model.proto TrainerSpec.ModelType.BPE

# The loaded BPE's options, kept as they are (only its merges change).
_BPE_OPTIONS = (
    "dropout",
    "unk_token",
    "continuing_subword_prefix",
    "end_of_word_suffix",
    "fuse_unk",
    "byte_fallback",
    "ignore_merges",
)

T = TypeVar("T", bound=PreTrainedTokenizerBase)


def load_tokenizer(folder: pathlib.Path, **options: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(folder, **options)``, split as SentencePiece splits."""
    return with_score_ordered_merges(AutoTokenizer.from_pretrained(folder, **options), folder)


def with_score_ordered_merges(tokenizer: T, folder: pathlib.Path) -> T:
    """``tokenizer`` (loaded from ``folder``) with its BPE merges in SentencePiece's order
    when it was converted from the folder's bare ``tokenizer.model``; changed in place."""
    model_file = pathlib.Path(folder) / "tokenizer.model"
    if (pathlib.Path(folder) / "tokenizer.json").is_file() or not model_file.is_file():
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.BPE):
        return tokenizer
    proto = model_proto(model_file.read_bytes())
    if proto.trainer_spec.model_type != _BPE:
        return tokenizer
    vocab, merges = score_ordered_bpe(proto)
    if backend.get_vocab(with_added_tokens=False) != vocab:
        return tokenizer  # not the plain conversion of this file: leave it as loaded
    old = backend.model
    kept = {
        name: getattr(old, name) for name in _BPE_OPTIONS if getattr(old, name, None) is not None
    }
    backend.model = models.BPE(vocab=vocab, merges=merges, **kept)
    return tokenizer


def model_proto(data: bytes) -> Any:
    """A SentencePiece model file's bytes, parsed (sentencepiece_model.proto ModelProto)."""
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(data)
    return proto


def score_ordered_bpe(proto: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (piece -> id) of a SentencePiece BPE model and its merges in
    SentencePiece's order, by the pieces' scores."""
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces}
    return vocab, generate_merges(vocab, scores)
