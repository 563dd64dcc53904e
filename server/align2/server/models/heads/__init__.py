"""Trained score heads, shipped as small JSON files and written into reward checkpoints.

A head is the method's scalar head ``score.weight`` (``[1, hidden]``, no bias), trained by
``align2 train-heads`` (align2.server.training) on the frozen backbone of one reward
checkpoint. This package holds the heads of the embedded defaults (``question.json``,
``answer.json``); :func:`install_shipped` writes one into a freshly built checkpoint, so
the checkpoint keeps its format and runs on both backends.

Why shipped and not trained at set-up: the preference data lives outside the package
(and outside a container image), and extracting its features takes many CPU minutes, while
a head is 576 numbers. The backbone build is deterministic, so a head trained on one
machine's backbone fits the backbone built anywhere; each file records the
:func:`backbone_revision` it was trained on, and installing it on another backbone logs a
warning instead of failing (the scores then differ from the reported ones).

File contract (``FORMAT``): ``weight`` holds the values exactly representable in ``dtype``
(the checkpoint's head dtype), so installing is lossless and the server's scores equal the
training tool's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from align2.server.formats import SCORE_KEY

log = logging.getLogger(__name__)

FORMAT = "align2-score-head-v1"
SHIPPED_DIR = pathlib.Path(__file__).parent
"""Where the embedded defaults' heads live (package data)."""
WEIGHTS_FILE = "model.safetensors"
"""The single weights file of the checkpoints :func:`install` writes to (the embedded ones)."""

_BACKBONE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TrainedHead:
    """One trained head and how it was made.

    ``weight`` is ``hidden`` floats, each exact in ``dtype`` (e.g. bfloat16);
    ``provenance`` is free-form JSON (data files and hashes, hyperparameters, accuracy).
    """

    head: str
    """question | answer."""
    weight: list[float]
    dtype: str
    backbone_revision: str
    template_version: str
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def tensor(self) -> torch.Tensor:
        """The head as ``score.weight``: ``[1, hidden]`` in ``dtype``."""
        return torch.tensor([self.weight], dtype=torch.float32).to(getattr(torch, self.dtype))

    @classmethod
    def from_tensor(cls, head: str, weight: torch.Tensor, **fields: Any) -> TrainedHead:
        """From a ``[1, hidden]`` or ``[hidden]`` tensor, stored exactly in its dtype."""
        dtype = str(weight.dtype).removeprefix("torch.")
        values = weight.detach().reshape(-1).float().tolist()
        return cls(head=head, weight=values, dtype=dtype, **fields)


def save(head: TrainedHead, folder: pathlib.Path) -> pathlib.Path:
    """Write ``head`` to ``folder/{head.head}.json`` (the folder is created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{head.head}.json"
    path.write_text(json.dumps(asdict(head), indent=1) + "\n")
    return path


def load(path: pathlib.Path) -> TrainedHead:
    """Read a head file; ValueError when it is not :data:`FORMAT`."""
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT}")
    return TrainedHead(**data)


def shipped(head: str) -> TrainedHead | None:
    """The head shipped for the embedded default ``head`` (question | answer), if any."""
    path = SHIPPED_DIR / f"{head}.json"
    return load(path) if path.is_file() else None


def install_shipped(folder: pathlib.Path, head: str) -> None:
    """Write the shipped ``head`` into the checkpoint ``folder``; keep its head if none ships."""
    trained = shipped(head)
    if trained is None:
        log.warning("no trained %s head ships with align2: keeping the untrained head", head)
        return
    install(folder, trained)


def install(folder: pathlib.Path, head: TrainedHead) -> None:
    """Replace ``score.weight`` in ``folder``'s single weights file by ``head``.

    Raises ValueError when the file has no head of that shape. The head is cast to the
    stored head's dtype (lossless for a head trained for this checkpoint). Logs a warning
    when ``head`` was trained on another backbone.
    """
    path = folder / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    old = tensors.get(SCORE_KEY)
    new = head.tensor()
    if old is None or old.shape != new.shape:
        found = None if old is None else list(old.shape)
        raise ValueError(f"{path}: {SCORE_KEY} is {found}, the {head.head} head {list(new.shape)}")
    tensors[SCORE_KEY] = new.to(old.dtype)
    # Write beside and rename: the loaded tensors may still map the old file.
    scratch = path.with_name(f".{path.name}.head")
    save_file(tensors, scratch, metadata=metadata)
    os.replace(scratch, path)
    revision = backbone_revision(folder)
    if revision != head.backbone_revision:
        log.warning(
            "the %s head was trained on backbone %s, installed on %s: its scores differ "
            "from the reported ones (retrain with align2 train-heads)",
            head.head,
            head.backbone_revision,
            revision,
        )


def backbone_revision(folder: pathlib.Path, length: int = 12) -> str:
    """A short sha256 of everything in a checkpoint folder except its score head.

    Covers the config, tokenizer and processor files and every safetensors tensor but
    ``score.weight`` (names, dtypes, shapes, bytes), in name order. Features computed by
    the frozen backbone depend on exactly this, so it keys the feature cache and tells
    whether a trained head fits a checkpoint.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file() and p.name[0] != "."):
        if file.suffix == ".safetensors":
            _hash_tensors(file, digest)
        elif file.suffix in _BACKBONE_SUFFIXES:
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:length]


def _hash_tensors(file: pathlib.Path, digest: Any) -> None:
    """Feed every tensor but the head into ``digest``, read straight from the file's layout
    (8-byte header length, JSON header with byte offsets, then the data)."""
    with file.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        for name in sorted(header):
            if name in ("__metadata__", SCORE_KEY):
                continue
            info = header[name]
            digest.update(f"{name}\0{info['dtype']}\0{info['shape']}\0".encode())
            start, end = info["data_offsets"]
            handle.seek(8 + size + start)
            remaining = end - start
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                digest.update(chunk)
                remaining -= len(chunk)
