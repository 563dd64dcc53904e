"""Reading a reward checkpoint folder: what both backends need before loading weights.

A reward checkpoint is a vision-language model folder (LLaVA or Idefics3/SmolVLM) plus a
scalar head: ``config.json`` says ``"num_labels": 1`` and the safetensors weights hold
``score.weight`` of shape ``[1, text_hidden]`` (the layout vLLM's pooling runner loads;
align2.server.models.builders writes it). The score of an input is the text model's final
hidden state at the last non-padding token times ``score.weight.T``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass

import torch
from safetensors import safe_open
from transformers import AutoConfig

from align2.server.formats import SCORE_KEY

FAMILIES: dict[str, str] = {"llava": "llava", "idefics3": "idefics3", "smolvlm": "idefics3"}
"""config.json model_type -> the family a backend implements (SmolVLM is Idefics3)."""

# What the revision hash covers: everything that changes what the model computes.
_HASHED_SUFFIXES = frozenset({".json", ".safetensors", ".jinja", ".model", ".txt", ".tiktoken"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RewardCheckpoint:
    """A validated reward checkpoint folder. ``score_weight`` is ``[1, hidden_size]``."""

    path: pathlib.Path
    family: str
    """llava | idefics3."""
    hidden_size: int
    """Hidden size of the text model (the head's input)."""
    score_weight: torch.Tensor
    """The head as stored (dtype of the checkpoint)."""
    model_id: str
    """The folder's name."""
    revision: str
    """The override given, else a short content hash of the folder (see folder_revision)."""


def read_reward_checkpoint(
    path: str | pathlib.Path, *, revision: str | None = None
) -> RewardCheckpoint:
    """Validate ``path`` as a reward checkpoint and read its head.

    ``revision``: reported as is when given (non-empty), else :func:`folder_revision`.
    Raises ValueError (naming the file and field) for an unsupported model_type,
    ``num_labels`` other than 1, a missing or mis-shaped ``score.weight``, or a LLaVA
    folder without ``tokenizer.json``;
    FileNotFoundError when ``path`` has no config.json.
    """
    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"{folder}/config.json model_type {config.model_type!r} is not a supported "
            f"reward family; supported: {', '.join(sorted(FAMILIES))}"
        )
    if config.num_labels != 1:
        # transformers' default is 2 labels; vLLM would then silently return two scores.
        raise ValueError(
            f"{folder}/config.json num_labels is {config.num_labels}; a reward checkpoint "
            f'needs "num_labels": 1 and a {SCORE_KEY} of shape [1, hidden]'
        )
    if family == "llava" and not (folder / "tokenizer.json").is_file():
        # transformers 5 converts a bare tokenizer.model unlike SentencePiece under a
        # "llava" config: no "▁" dummy prefix, merges by id (models/sentencepiece_merges).
        raise ValueError(
            f"{folder}: a LLaVA reward checkpoint needs a tokenizer.json (it has "
            f"{'only tokenizer.model' if (folder / 'tokenizer.model').is_file() else 'none'}"
            "); transformers 5 would tokenise a bare SentencePiece model unlike the "
            "reference. Convert it with `align2 convert-reward`, which writes one checked "
            "against LLaVA's split"
        )
    hidden = int(config.get_text_config().hidden_size)
    weight = _read_score_weight(folder)
    if tuple(weight.shape) != (1, hidden):
        raise ValueError(
            f"{folder}: {SCORE_KEY} has shape {list(weight.shape)}, expected [1, {hidden}] "
            "(1 x the text hidden size)"
        )
    return RewardCheckpoint(
        path=folder,
        family=family,
        hidden_size=hidden,
        score_weight=weight,
        model_id=folder.absolute().name,
        revision=revision or folder_revision(folder),
    )


def _read_score_weight(folder: pathlib.Path) -> torch.Tensor:
    """Find ``score.weight`` via the shard index when there is one, else by scanning."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / weight_map[SCORE_KEY]] if SCORE_KEY in weight_map else []
    else:
        files = sorted(folder.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if SCORE_KEY in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                return handle.get_tensor(SCORE_KEY)
    raise ValueError(
        f"{folder}: no {SCORE_KEY} in its safetensors weights; a reward checkpoint needs "
        "the scalar head"
    )


def folder_revision(folder: pathlib.Path, length: int = 12) -> str:
    """A short sha256 over the names and contents of the folder's model files.

    Covers the top-level json, safetensors, chat-template and tokenizer files in name
    order (so it is the same on every machine), streamed in 1 MiB chunks.
    """
    digest = hashlib.sha256()
    files = sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix in _HASHED_SUFFIXES
    )
    for file in files:
        # Length-prefixed name so that moving bytes between files changes the hash.
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:length]
