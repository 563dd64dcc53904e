"""The rewrite guards: image marker, truncation, emptiness, numbers and named entities."""

from __future__ import annotations

from decimal import Decimal

import pytest

from align2.server.core.guards import (
    check_rewrite,
    entities,
    numbers,
    restore_marker,
    split_marker,
)


def test_marker_split_and_restore() -> None:
    assert split_marker("<image>\nWhat is it?") == ("<image>\n", "What is it?", "")
    assert split_marker("What is it?\n<image>") == ("", "What is it?", "\n<image>")
    assert split_marker("  What is it? ") == ("", "What is it?", "")
    assert split_marker("What <image> is it?") is None
    assert restore_marker("<image>\nWhat?", " Which one? ") == "<image>\nWhich one?"
    assert restore_marker("What?\n<image>", "Which?") == "Which?\n<image>"
    assert restore_marker("What?", "Which?") == "Which?"


def test_a_text_of_several_lines_is_one_part() -> None:
    """Answers have paragraphs: Align failed them with INTERNAL (the split did not match)."""
    answer = "First, the sink.\n\nSecond, the light.\nThird."
    assert split_marker(answer) == ("", answer, "")
    assert split_marker(f"<image>\n{answer}\n") == ("<image>\n", answer, "")
    assert split_marker(f"{answer}\n<image>") == ("", answer, "\n<image>")
    assert split_marker("One.\n<image>\nTwo.") is None
    assert restore_marker(answer, "Firstly the sink.\nThen the light.") == (
        "Firstly the sink.\nThen the light."
    )


@pytest.mark.parametrize(
    ("original", "rewrite", "finished", "guard"),
    [
        ("What is it?", "What <image> is it?", True, "image_marker"),
        ("What <image> is it?", "Which is it?", True, "image_marker"),
        ("A dog runs.", "A dog", False, "truncated"),
        ("A dog runs.", " \n ", True, "empty"),
        ("There are 3 dogs.", "There are 4 dogs.", True, "numbers_changed"),
        ("There are 3 dogs.", "There are dogs.", True, "numbers_changed"),
        ("There are dogs.", "There are 2 dogs.", True, "numbers_changed"),
        ("The Eiffel Tower is tall.", "The tower is tall.", True, "entities_changed"),
        ("The tower is tall.", "The tower in Rome is tall.", True, "entities_changed"),
        ("A dog runs.", "A brown dog runs fast.", True, None),
        ("<image>\nWhat is it?", "Which thing is it?", True, None),
    ],
)
def test_check_rewrite(original: str, rewrite: str, finished: bool, guard: str | None) -> None:
    assert check_rewrite(original, rewrite, finished=finished) == guard


def test_a_rewrite_spelling_a_control_token_is_not_used() -> None:
    """Shown to the review, ``</s>`` would act as the LLM's end of text."""
    tokens = ("</s>", "<s>")
    assert check_rewrite(
        "A dog runs.", "A dog</s> runs.", finished=True, control_tokens=tokens
    ) == ("control_token")
    assert check_rewrite("A dog runs.", "A dog runs.", finished=True, control_tokens=tokens) is None


def test_numbers_compare_by_value() -> None:
    assert numbers("1,000 people paid 3.50 and two more") == {
        Decimal(1000),
        Decimal("3.5"),
        Decimal(2),
    }
    assert numbers("1000 people paid 3.5 and 2 more") == numbers("1,000 people, 3.50, two")
    assert numbers("items 2, 3 and 4") == {Decimal(2), Decimal(3), Decimal(4)}
    assert numbers("a dozen eggs") == numbers("12 eggs")
    assert numbers("no digits here") == set()


def test_entities_heuristic() -> None:
    text = "The Eiffel Tower is in Paris, France. I'm sure NASA saw it on TV."
    assert entities(text) == ["Eiffel Tower", "Paris", "France", "NASA", "TV"]
    assert entities("Paris is big.") == []  # a name that only starts a sentence is missed
    assert entities("What is the man holding?") == []


def test_entities_count_as_kept_when_moved_or_recased() -> None:
    original = "The photo was taken in Paris near the Eiffel Tower."
    assert check_rewrite(original, "Paris: the eiffel tower is near.", finished=True) is None
