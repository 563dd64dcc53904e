"""The inputs of a reward conversion: located, checked, and hashed for provenance and cache.

A conversion reads three folders: the original-LLaVA base, the PEFT adapter and the CLIP
tower that ``mm_vision_tower`` names. :func:`locate` finds and checks them without reading
weights; :func:`input_digests` hashes every file a conversion reads (the provenance file
lists them, and the server's cache of conversions is keyed by them).
"""

from __future__ import annotations

import hashlib
import pathlib
import threading
from dataclasses import dataclass
from typing import Any

from align2.server.models import llava_original as orig
from align2.server.models.llava_original import ConversionError

_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass(frozen=True)
class Inputs:
    """The three input folders, located and their configs checked (no weights read yet)."""

    base: orig.OriginalBase
    adapter: pathlib.Path
    tower: orig.VisionTower
    model_config: dict[str, Any]
    config_source: str
    """adapter | base: whose config.json defines the model (the reference: the adapter's)."""

    def files(self) -> dict[str, list[pathlib.Path]]:
        """Every file a conversion reads, by role (what the provenance and cache key hash)."""
        base, tower = self.base.folder, self.tower.folder
        return {
            "base": [
                *_with_index(self.base.files),
                base / "config.json",
                *(base / n for n in _TOKENIZER_FILES if (base / n).is_file()),
            ],
            "adapter": [
                *(
                    self.adapter / n
                    for n in ("adapter_config.json", "config.json", "non_lora_trainables.bin")
                    if (self.adapter / n).is_file()
                ),
                *_with_index(orig.weight_files(self.adapter, "adapter_model")),
            ],
            "vision_tower": [
                tower / "config.json",
                tower / "preprocessor_config.json",
                *_with_index(self.tower.files),
            ],
        }


def locate(
    base: pathlib.Path, adapter: pathlib.Path, vision_tower: pathlib.Path | None = None
) -> Inputs:
    """Find and check the inputs: the base's format, the model config, the CLIP folder."""
    for role, folder in (("base", base), ("adapter", adapter)):
        if not folder.is_dir():
            raise ConversionError(f"{role} {folder} is not a folder")
    original = orig.read_base(base)
    if not (adapter / "adapter_config.json").is_file():
        raise ConversionError(f"{adapter}: no adapter_config.json (not a PEFT adapter)")
    if (adapter / "config.json").is_file():
        model_config, source = orig.read_json(adapter / "config.json"), "adapter"
    else:
        model_config, source = original.config, "base"
    orig.check_supported(model_config, (base if source == "base" else adapter) / "config.json")
    tower = orig.resolve_tower(model_config, vision_tower)
    return Inputs(original, adapter, tower, model_config, source)


# -- provenance and the cache key -------------------------------------------------------------
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def input_digests(inputs: Inputs) -> dict[str, Any]:
    """``{role: {"folder": name, "files": {file: sha256}}}`` for every file read."""
    return {
        role: {"folder": files[0].parent.name, "files": {f.name: file_sha256(f) for f in files}}
        for role, files in inputs.files().items()
    }


def file_sha256(file: pathlib.Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for this process: the question
    and answer models share a 13 GB base, hashed once."""
    stat = file.stat()
    memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    with _DIGESTS_LOCK:
        if memo in _DIGESTS:
            return _DIGESTS[memo]
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    with _DIGESTS_LOCK:
        _DIGESTS[memo] = digest.hexdigest()
    return digest.hexdigest()


def _with_index(files: list[pathlib.Path]) -> list[pathlib.Path]:
    """Weight files plus the shard index that lists them, when there is one."""
    if not files:
        return []
    indexes = [p for p in files[0].parent.glob("*.index.json") if p.is_file()]
    return sorted({*files, *(i for i in indexes if any(f.name in i.read_text() for f in files))})
