"""A tiny deterministic byte-level BPE tokenizer for the offline test models.

No tokenizer can be downloaded here, so the tiny models get one trained in a few
milliseconds on a fixed in-code corpus. Contract of :func:`build_tokenizer`:

- the same arguments give byte-identical tokenizer files (the corpus, the vocabulary size
  and the order of the special tokens are all fixed);
- byte-level: any text round-trips, nothing maps to ``<unk>``;
- encoding with ``add_special_tokens=True`` prepends BOS (like Llama/Vicuna) and never
  appends EOS, which is what the reward templates of the method need;
- the family's special tokens (``<image>`` etc.) are single, never-split tokens;
- a ChatML-style chat template (``<|im_start|>role\\n...<|im_end|>``); EOS is ``<|im_end|>``
  so that generation stops at the end of the assistant turn.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from align2.server.models.sentencepiece_merges import model_proto, score_ordered_bpe

BOS = "<s>"
EOS = "<|im_end|>"
PAD = "<pad>"
UNK = "<unk>"
IM_START = "<|im_start|>"

LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<image>",)
"""Extra special tokens a LLaVA tokenizer needs."""

IDEFICS3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
)
"""Extra special tokens an Idefics3 / SmolVLM tokenizer needs (the processor looks them up)."""

# HF renders chat templates with trim_blocks: the newline after a block tag is dropped, so
# every newline is written as an expression. BOS comes from the template because chat
# prompts are tokenised without special tokens (transformers and vLLM both do so).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# Enough varied English for a few hundred merges; fixed so that training is reproducible.
CORPUS = """
The quick brown fox jumps over the lazy dog. A man is riding a bicycle down the street.
What is the color of the bus in the image? The bus is red and white, and it is parked
next to the sidewalk. How many people are sitting on the bench? There are two people
sitting on the bench, and one of them is reading a newspaper.
Describe the image in detail. The image shows a kitchen with a wooden table, four chairs,
a refrigerator, and a window that lets in the afternoon light. On the counter there is a
bowl of fruit with apples, bananas and oranges.
Question: What might be the reason for the crowd gathering here? Answer: The crowd is
probably watching a street performance, since many of them are facing the same direction
and some are holding up their phones to take pictures.
Rewrite the following question and answer in your own words without changing the meaning.
Which version is better, the original or the rewritten one? Answer with one word.
A cat is sleeping on a sofa near a lamp. Two dogs are playing with a ball in the park.
The weather looks sunny and warm, and the sky is clear with a few white clouds.
A woman in a blue dress holds an umbrella while she walks across the bridge.
The train is arriving at the station, and passengers are waiting on the platform.
There is a large clock on the tower, which shows that the time is almost noon.
Children are flying kites on the beach, and the waves are breaking on the sand.
Is there anything unusual about this picture? Yes, the giraffe is standing inside a
building, which is not where giraffes are usually found.
Numbers and symbols also appear: 1, 2, 3, 10, 42, 100, 2024; (a), [b], {c}; 50% and $3.
"""


def build_tokenizer(
    special_tokens: Sequence[str] = LLAVA_SPECIAL_TOKENS,
    *,
    vocab_size: int = 512,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train the tiny BPE and wrap it for transformers.

    ``special_tokens`` are the family's extra tokens (e.g. :data:`IDEFICS3_SPECIAL_TOKENS`);
    they get the ids right after ``<unk> <s> <|im_end|> <pad> <|im_start|>`` (0-4), in order.
    ``vocab_size`` is an upper bound: a small corpus may yield fewer merges.
    """
    core = [UNK, BOS, EOS, PAD, IM_START]
    family = [tok for tok in special_tokens if tok not in core]
    backend = _train(core + family, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START, *family],
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def _train(specials: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE whose post-processor prepends BOS only."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # The full byte alphabet keeps every input encodable without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.strip().splitlines(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def llama_tokenizer(
    model_file: str | pathlib.Path,
    special_tokens: Sequence[str] = LLAVA_SPECIAL_TOKENS,
    *,
    legacy: bool = False,
    model_max_length: int = 2048,
) -> LlamaTokenizer:
    """Wrap a Llama-style SentencePiece BPE ``tokenizer.model`` (byte fallback, "▁" dummy
    prefix) as transformers' LlamaTokenizer, the way Vicuna's ships.

    The BPE merges are ordered by the pieces' scores, as SentencePiece applies them and as
    the ``tokenizer.json`` files made by transformers 4 hold them. transformers 5 loading a
    bare ``tokenizer.model`` orders them by id instead, which differs for Llama's
    whitespace-only pieces (``"▁▁"`` is id 259 with score -1e9): ``"a  b"`` would become
    ``["▁a", "▁▁", "b"]`` instead of SentencePiece's ``["▁a", "▁", "▁b"]``.

    BOS is added, EOS is not; ``<pad>`` and ``special_tokens`` are appended after the
    vocabulary, as llava-hf does. ``legacy`` is transformers' switch for the "▁" piece after
    a special token: False (its default) drops it in ``"<image>\\n..."``, True keeps it.
    """
    proto = model_proto(pathlib.Path(model_file).read_bytes())
    vocab, merges = score_ordered_bpe(proto)
    pieces = [piece.piece for piece in proto.pieces]
    spec = proto.trainer_spec
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=pieces[spec.unk_id],
        bos_token=pieces[spec.bos_id],
        eos_token=pieces[spec.eos_id],
        legacy=legacy,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
    )
    tokenizer.add_special_tokens(
        {"pad_token": PAD, "additional_special_tokens": list(special_tokens)}
    )
    return tokenizer


_LOAD_OPTIONS = ("is_local", "local_files_only", "gguf_file")


def strip_load_options(tokenizer: PreTrainedTokenizerBase) -> None:
    """Drop the options a tokenizer was *loaded* with from what it will save.

    transformers keeps ``from_pretrained`` options such as ``local_files_only`` and
    ``is_local`` in ``init_kwargs`` and writes them back into ``tokenizer_config.json``;
    they describe one machine's load, not the tokenizer.
    """
    for key in _LOAD_OPTIONS:
        tokenizer.init_kwargs.pop(key, None)
