"""Guards: cheap checks that reject a rewrite in favour of its original, before any review.

Each guard has a name, reported as the turn's reason when it fires (the first one that
fires, in this order):

- ``image_marker``: the rewrite contains ``<image>`` (the LLM never sees one, so it made it
  up), or the original's marker is not at the start or end of its text, so its place in a
  rewrite is undefined;
- ``control_token``: the rewrite spells one of the inner LLM's control tokens
  (``</s>``, ``<|im_end|>``, ...): shown in the review's prompt it would act as one;
- ``truncated``: generation stopped at the token limit, so the text may be cut;
- ``empty``: nothing but whitespace came back;
- ``numbers_changed``: the set of numbers differs. Digits are compared by value ("1,000" =
  "1000", "3.50" = "3.5") and the number words zero..twenty, the tens, hundred, thousand,
  million and dozen count as their values ("two" = "2"). Conservative: "one" used as a
  pronoun counts too, so a rewrite that drops it is rejected;
- ``entities_changed``: a named entity of one text is missing from the other. Heuristic,
  no NER model: an entity is a run of capitalised words (a multiword span such as
  "Eiffel Tower" stays one entity) not counting the first word of a sentence, plus any
  all-capitals acronym ("NASA", "TV"); "I" is not one. Presence is a case-insensitive
  whole-phrase match in the other text, so a name that moves to the start of a sentence
  still counts as kept. Misses: a one-word name that only ever starts a sentence.

Numbers and entities are checked on whatever was rewritten: a question's as well as an
answer's (the method keeps every fact, number and entity).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from align2.server.core.templates import IMAGE_TOKEN, clean

IMAGE_MARKER = "image_marker"
CONTROL_TOKEN = "control_token"
TRUNCATED = "truncated"
EMPTY = "empty"
NUMBERS_CHANGED = "numbers_changed"
ENTITIES_CHANGED = "entities_changed"
GUARDS = (IMAGE_MARKER, CONTROL_TOKEN, TRUNCATED, EMPTY, NUMBERS_CHANGED, ENTITIES_CHANGED)

# DOTALL: a text of several lines (an answer's paragraphs) is one middle part.
_MARKED = re.compile(
    rf"(\s*{re.escape(IMAGE_TOKEN)}\s*)?(.*?)(\s*{re.escape(IMAGE_TOKEN)}\s*)?", re.DOTALL
)
_DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?")
_GROUPED = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
_NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate(_UNITS.split(" "))} | {
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
    "million": 1_000_000,
    "dozen": 12,
}
_WORDS = re.compile(r"[A-Za-z]+")
# Words and the punctuation between them; a run of capitalised words breaks at punctuation.
_TOKENS = re.compile(r"[^\W\d_][\w'’-]*|[^\w\s]|\d+|\n")
_SENTENCE_END = frozenset(".!?:;\n")


def split_marker(text: str) -> tuple[str, str, str] | None:
    """``text`` as (prefix, clean text, suffix), where prefix/suffix hold the ``<image>``
    marker with its whitespace when it sits at the start/end; None when a marker sits
    anywhere else (its place in a rewrite would be undefined)."""
    match = _MARKED.fullmatch(text)
    assert match is not None  # every part is optional
    prefix, middle, suffix = match.group(1) or "", match.group(2), match.group(3) or ""
    if IMAGE_TOKEN in middle:
        return None
    return prefix, middle.strip(), suffix


def restore_marker(original: str, rewrite: str) -> str:
    """``rewrite`` (without marker) with ``original``'s marker put back in the same place."""
    parts = split_marker(original)
    if parts is None:
        return rewrite.strip()
    prefix, _, suffix = parts
    return f"{prefix}{rewrite.strip()}{suffix}"


def check_rewrite(
    original: str, rewrite: str, *, finished: bool, control_tokens: Sequence[str] = ()
) -> str | None:
    """The name of the first guard that rejects ``rewrite`` of ``original``, or None.

    ``original`` is the text as sent (it may hold the marker); ``rewrite`` is the LLM's
    text; ``finished`` is False when generation hit the token limit; ``control_tokens``:
    the inner LLM's (GenerationBackend.control_tokens).
    """
    if IMAGE_TOKEN in rewrite or split_marker(original) is None:
        return IMAGE_MARKER
    if any(token in rewrite for token in control_tokens):
        return CONTROL_TOKEN
    if not finished:
        return TRUNCATED
    if not rewrite.strip():
        return EMPTY
    before, after = clean(original), clean(rewrite)
    if numbers(before) != numbers(after):
        return NUMBERS_CHANGED
    if _missing_entities(before, after) or _missing_entities(after, before):
        return ENTITIES_CHANGED
    return None


def numbers(text: str) -> set[Decimal]:
    """Every number in ``text`` by value: digits (thousands commas allowed) and words."""
    found: set[Decimal] = set()
    for match in _DIGITS.finditer(text):
        token = match.group().rstrip(",")
        pieces = [token.replace(",", "")] if _GROUPED.fullmatch(token) else token.split(",")
        for piece in filter(None, pieces):
            try:
                found.add(Decimal(piece).normalize())
            except InvalidOperation:  # pragma: no cover - the pattern yields numbers only
                continue
    for word in _WORDS.findall(text):
        value = _NUMBER_WORDS.get(word.lower())
        if value is not None:
            found.add(Decimal(value))
    return found


def entities(text: str) -> list[str]:
    """Named-entity candidates of ``text`` by the heuristic in the module docstring."""
    found: list[str] = []
    run: list[str] = []
    sentence_start = True
    for token in _TOKENS.findall(text):
        if not token[0].isalpha():
            _flush(run, found)
            sentence_start = token in _SENTENCE_END or (sentence_start and not token.isdigit())
            continue
        if _is_acronym(token) or (token[0].isupper() and not _is_i(token) and not sentence_start):
            run.append(token)
        elif token[0].isupper() and sentence_start:
            _flush(run, found)  # the sentence's first word: not evidence of a name
        else:
            _flush(run, found)
        sentence_start = False
    _flush(run, found)
    return found


def _flush(run: list[str], found: list[str]) -> None:
    if run:
        found.append(" ".join(run))
        run.clear()


def _is_i(token: str) -> bool:
    """ "I" and its contractions ("I'm", "I’ll") are capitalised but name nothing."""
    return re.split(r"['’]", token)[0] == "I"


def _is_acronym(token: str) -> bool:
    letters = [c for c in token if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _missing_entities(source: str, other: str) -> list[str]:
    """Entities of ``source`` that ``other`` does not mention (case-insensitive phrase)."""
    haystack = " ".join(_TOKENS.findall(other)).lower()
    return [e for e in entities(source) if not re.search(rf"\b{re.escape(e.lower())}\b", haystack)]
