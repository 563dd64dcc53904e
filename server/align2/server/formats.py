"""Names fixed by the data and checkpoint formats align2 reads and writes, defined once.

Every layer that needs one imports it from here: the method's templates (core), the
tokenizer and checkpoint writers (models), the checkpoint readers and runtimes (backends).
"""

IMAGE_TOKEN = "<image>"
"""The image marker of LLaVA-format text. The reward templates put it first; a LLaVA
tokenizer keeps it as one token, the place where the image's features go."""

SCORE_KEY = "score.weight"
"""The safetensors key of a reward checkpoint's scalar head, ``[1, text_hidden]``: the
top-level ``score`` module that vLLM's classify adapter loads."""
