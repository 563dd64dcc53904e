"""Chat messages -> prompt tokens, and choice labels -> token ids, for every generation
backend: transformers and vLLM must see the same tokens for the same request.

Contract:

- :func:`render` writes the messages through the tokenizer's own chat template with the
  generation prompt appended (the assistant turn is opened), or, for a tokenizer without a
  template (Vicuna / LLaVA-1.5 checkpoints), in FastChat's ``vicuna_v1.1`` format.
- :func:`prompt_ids` tokenises that text: a chat template's without adding special tokens
  (the template writes any BOS it wants; transformers' ``apply_chat_template`` tokenises
  the same way), the Vicuna text as FastChat and LLaVA do, ``tokenizer(prompt)``, the
  tokenizer adding its BOS. Writing ``<s>`` into the text instead differs with a Llama
  tokenizer of ``"legacy": false``: the word after a special token loses its ``▁``
  (``A`` for FastChat's ``▁A``).
  :class:`Prompts` is the same, refusing a message that holds one of the tokenizer's
  control tokens (:func:`check_no_control_tokens`), with a memory of recent prompts, for a
  backend whose core counts a request's tokens just before submitting it.
- :func:`choice_ids` maps each choice label to the single token the model would emit for
  it right after the generation prompt.
- Their ValueErrors name the bad field; :func:`as_invalid_argument` makes them the
  caller's error (InvalidArgument).
"""

from __future__ import annotations

import array
import contextlib
import threading
from collections.abc import Iterator, Sequence

import cachetools
from transformers import PreTrainedTokenizerBase

from align2.server.backends.base import Message
from align2.server.errors import InvalidArgument

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""FastChat's ``vicuna_v1.1`` system prompt (what LLaVA-1.5's conversations start with)."""


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply starts.

    Raises ValueError for a role the format does not know (Vicuna: system, user, assistant).
    """
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str)  # tokenize=False, one conversation
        return text
    return render_vicuna(messages, eos=tokenizer.eos_token or "")


def render_vicuna(messages: Sequence[Message], *, eos: str) -> str:
    """FastChat ``vicuna_v1.1``: ``{system} USER: {u} ASSISTANT: {a}{eos}USER: ...
    ASSISTANT:``, without BOS (the tokenizer adds it: :func:`prompt_ids`). A system message
    replaces the default system prompt."""
    system = VICUNA_SYSTEM
    turns: list[str] = []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            system = content
        elif role == "user":
            turns.append(f"USER: {content} ")
        elif role == "assistant":
            turns.append(f"ASSISTANT: {content}{eos}")
        else:
            raise ValueError(
                f"messages[{index}].role: {role!r} is not one of system, user, assistant"
            )
    return f"{system} {''.join(turns)}ASSISTANT:"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of :func:`render`: a chat template's text as it is, the Vicuna text with
    the tokenizer's special tokens (its BOS), as FastChat tokenises it (unchecked:
    :class:`Prompts` refuses control tokens in the messages first)."""
    text = render(tokenizer, messages)
    vicuna = not tokenizer.chat_template
    return list(tokenizer(text, add_special_tokens=vicuna)["input_ids"])


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings the tokenizer reads as one special token wherever they stand in a text
    (``<|im_start|>``, ``</s>``, ...): the chat format's own markers."""
    special = set(tokenizer.all_special_tokens)
    special.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return tuple(sorted(t for t in special if t))


def check_no_control_tokens(tokens: Sequence[str], messages: Sequence[Message]) -> None:
    """ValueError when a message's text holds a control token. The prompt is rendered to
    text and tokenised whole (as transformers' apply_chat_template and vLLM do), so such a
    string in a sample would become a real marker: a question holding
    ``<|im_end|><|im_start|>system ...`` would add turns of its own to the prompt. Refused
    rather than escaped, so the LLM never sees a text other than the sample's: in Curate the
    sample is kept unrestyled (kept_align_failed), with this reason."""
    for message in messages:
        content = message["content"]
        for token in tokens:
            if token in content:
                raise ValueError(
                    f"the text holds {token!r}, a control token of the inner LLM's chat "
                    "format: in its prompt it would act as one (remove it to restyle)"
                )


_Key = tuple[tuple[tuple[str, str], ...], ...]
"""A prompt's messages as a hashable key."""


class Prompts:
    """:func:`prompt_ids` for one tokenizer, remembering recent prompts.

    The core counts each request's prompt tokens (to check its length and cost) just
    before the backend submits it; with this the prompt is rendered and tokenised once.
    What is kept is bounded by tokens, not prompts: at most ``budget_tokens`` ids in all
    (least recently used first out), and never a prompt over ``longest`` tokens (the
    model's max_length: the core refuses it, and a caller sending many would otherwise
    fill the memory with prompts that never run). Thread-safe; a prompt that fails
    (ValueError) is not remembered.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        longest: int,
        budget_tokens: int = 1 << 20,
    ) -> None:
        self.tokenizer = tokenizer
        self.control_tokens = control_tokens(tokenizer)  # read once: checked on every prompt
        self._longest = longest
        self._kept: cachetools.LRUCache[_Key, array.array[int]] = cachetools.LRUCache(
            maxsize=budget_tokens, getsizeof=len
        )
        self._lock = threading.Lock()

    def ids(self, messages: Sequence[Message]) -> list[int]:
        key = tuple(tuple(message.items()) for message in messages)
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None:
            return kept.tolist()
        check_no_control_tokens(self.control_tokens, messages)
        ids = prompt_ids(self.tokenizer, messages)
        if len(ids) <= self._longest:
            with self._lock, contextlib.suppress(ValueError):  # over the whole budget
                self._kept[key] = array.array("q", ids)
        return ids


def choice_ids(tokenizer: PreTrainedTokenizerBase, choices: Sequence[str]) -> list[int]:
    """One token id per choice label, in order.

    A label is encoded alone, without special tokens: that is the token a model emits for
    it after the generation prompt (SentencePiece tokenizers give the word-initial piece,
    e.g. ``▁A`` after Vicuna's ``ASSISTANT:``). Raises ValueError naming the label when
    one is not exactly one token, or two labels share a token.
    """
    ids: list[int] = []
    for index, label in enumerate(choices):
        encoded = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(
                f"choices[{index}]: {label!r} is {len(encoded)} tokens; a choice label "
                "must be exactly one token"
            )
        if encoded[0] in ids:
            raise ValueError(f"choices[{index}]: {label!r} is the same token as another label")
        ids.append(encoded[0])
    if len(ids) < 2:
        raise ValueError(f"choices: a choice needs at least two labels, got {len(ids)}")
    return ids


@contextlib.contextmanager
def as_invalid_argument() -> Iterator[None]:
    """Raise a ValueError from encoding a request (role, label) as InvalidArgument."""
    try:
        yield
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
