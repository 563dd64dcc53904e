"""What the GPU benchmarks share: the paper's model shapes (and tiny ones for CPU dry runs),
and the server config around models built in memory.

The shapes: Vicuna-7B (the inner LLM, and the language model of LLaVA-1.5-7B, the reward
models' base) and CLIP ViT-L/14-336 (LLaVA-1.5's vision tower). Random weights of these
shapes give the real FLOPs, memory traffic and kernels; the tiny ones run the same code.
"""

from __future__ import annotations

import os
from typing import Any

from align2.server.config import Config, ModelConfig

VICUNA_7B: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
CLIP_L_336: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=512,
)
TINY_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=336,
    patch_size=14,
    projection_dim=32,
)


def server_config(models: dict[str, ModelConfig], max_batch_size: int) -> Config:
    """The default config serving ``models`` (backends the caller registers), batches of up
    to ``max_batch_size`` that no token budget cuts short, and image/text preparation on as
    many workers as the machine has cores (up to 16): the GPU is what is measured."""
    config = Config()
    config.models = models
    config.batching.max_batch_size = max_batch_size
    config.batching.max_batch_tokens = 1 << 22
    config.batching.preprocess_workers = min(16, os.cpu_count() or 2)
    return config
