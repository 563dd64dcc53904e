"""Reward adapters written in the release's layout (what ``align2 train-lora`` ships).

The paper's released reward models are PEFT LoRA adapters saved by the reference trainer
(see align2.server.models.llava_original for the facts): ``adapter_config.json`` (a
``LoraConfig`` with ``task_type`` SEQ_CLS), ``adapter_model.safetensors`` with
``base_model.model.model.layers.N.<module>.lora_{A,B}.weight`` and the score head as
``base_model.model.score.weight``, and the trained model's ``config.json``. A file written
here is read back by the very reader that reads the release (``llava_original.
read_adapter``), which is what the server loads (tests check the round trip).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from align2.server.formats import SCORE_KEY
from align2.server.models.original_builders import LLM_LINEAR

PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraShape:
    """Where the LoRA goes and its size: ``layers`` (indices of the language model's decoder
    layers), ``modules`` (of each layer, names as in ``LLM_LINEAR``), rank and alpha."""

    layers: tuple[int, ...]
    r: int = 8
    alpha: int = 16
    modules: tuple[str, ...] = LLM_LINEAR

    def module_names(self) -> list[str]:
        """Original-LLaVA module names: ``model.layers.N.self_attn.q_proj``..."""
        return [
            f"model.layers.{layer}.{_PARENT[m]}.{m}" for layer in self.layers for m in self.modules
        ]

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=list(self.modules),
            layers_to_transform=list(self.layers),
            lora_dropout=0.0,
            bias="none",
            task_type="SEQ_CLS",
        )


_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def initial_lora(
    shape: LoraShape, sizes: Mapping[str, tuple[int, int]], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's initialisation, from ``seed``: ``A`` Kaiming-uniform (a = sqrt 5), ``B`` zero,
    so the untrained adapter computes exactly the base. ``sizes``: module -> (in, out)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name in shape.module_names():
        fan_in, fan_out = sizes[name.rsplit(".", 1)[-1]]
        a = torch.empty(shape.r, fan_in)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as PEFT
        lora[name] = (a, torch.zeros(fan_out, shape.r))
    return lora


def initial_head(hidden: int, seed: int, std: float = 0.02) -> torch.Tensor:
    """The score head as ``LlamaForSequenceClassification`` draws it (normal, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, hidden, generator=generator) * std


def write_adapter(
    folder: pathlib.Path,
    shape: LoraShape,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    head: torch.Tensor,
    base_config: Mapping[str, object],
    *,
    extra_files: Sequence[tuple[str, str]] = (),
) -> pathlib.Path:
    """Write the adapter into ``folder`` (replaced whole: written in a temporary sibling and
    renamed, so a crash never leaves a partial adapter). ``extra_files``: (name, text)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        shape.peft_config().save_pretrained(str(scratch))
        # peft keeps target_modules as a set: sorted, so the file is the same on every run.
        config_file = scratch / "adapter_config.json"
        peft_config = json.loads(config_file.read_text())
        peft_config["target_modules"] = sorted(peft_config["target_modules"])
        config_file.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        weights = {}
        for name, (a, b) in lora.items():
            weights[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous()
            weights[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().contiguous()
        weights[PREFIX + SCORE_KEY] = head.detach().float().reshape(1, -1).contiguous()
        save_file(weights, str(scratch / "adapter_model.safetensors"), metadata={"format": "pt"})
        trained = dict(base_config) | {
            "architectures": ["LlavaLlamaModelForSequenceClassification"],
            "model_type": "llava_llama",
            "tokenizer_padding_side": "right",
        }
        (scratch / "config.json").write_text(json.dumps(trained, indent=2, sort_keys=True) + "\n")
        for name, text in extra_files:
            (scratch / name).write_text(text)
        os.chmod(scratch, 0o755)  # mkdtemp's 0700 would follow the rename
        old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
        if folder.exists():
            os.rename(folder, old)
        os.rename(scratch, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
