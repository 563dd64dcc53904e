"""Models built offline: tiny test models of both reward families and the embedded defaults.

- ``builders``: deterministic LLaVA and Idefics3 model folders (reward checkpoints with a
  ``score.weight`` head, or plain generation models), any size from tiny to tens of
  millions of parameters.
- ``embedded``: the ``embedded:NAME`` defaults (real SmolLM2-135M-Instruct and two
  Idefics3 reward checkpoints over it), built on first use into a cache dir.
- ``tokenizers``: the tiny byte-level BPE tokenizer the random models use.
- ``convert_reward`` (with ``llava_original``, ``llava_tokenizer``, ``reward_inputs``): the
  paper's released reward models (original-LLaVA base + PEFT LoRA adapter) as align2 reward
  checkpoints; ``original_builders`` writes tiny inputs in that release format;
  ``shared_llava`` holds one such base in memory for several adapters (``share_base``).
"""

from align2.server.formats import SCORE_KEY
from align2.server.models.builders import (
    build_idefics3_reward,
    build_llava_reward,
    idefics3_image_tokens,
    llava_image_tokens,
)
from align2.server.models.embedded import EMBEDDED_NAMES, ensure, model_dir, resolve
from align2.server.models.tokenizers import (
    IDEFICS3_SPECIAL_TOKENS,
    LLAVA_SPECIAL_TOKENS,
    build_tokenizer,
)

__all__ = [
    "EMBEDDED_NAMES",
    "IDEFICS3_SPECIAL_TOKENS",
    "LLAVA_SPECIAL_TOKENS",
    "SCORE_KEY",
    "build_idefics3_reward",
    "build_llava_reward",
    "build_tokenizer",
    "ensure",
    "idefics3_image_tokens",
    "llava_image_tokens",
    "model_dir",
    "resolve",
]
