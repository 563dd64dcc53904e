"""Details of the rewrite guards (number and entity reading, which guard fires first) and
of the Align template sets a server refuses to load."""

from __future__ import annotations

import pathlib
import shutil
from decimal import Decimal

import pytest

from align2.client.types import Turn
from align2.server.core.guards import check_rewrite, entities, numbers
from align2.server.core.prompts import TemplateLibrary, load_set, templates_root


def copy_default(root: pathlib.Path, name: str = "mine-v1") -> pathlib.Path:
    source = pathlib.Path(str(templates_root() / "default-v1"))
    target = root / name
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------------------------------
# guards.py


def test_the_image_marker_guard_comes_before_truncation() -> None:
    """The first guard that fires, in the documented order. Fails on: swapping the checks."""
    assert check_rewrite("What is it?", "What <image> is", finished=False) == "image_marker"


def test_a_grouped_number_followed_by_a_comma_is_one_number() -> None:
    """ "1,000," is 1000 (the trailing comma is punctuation). Fails on: no ``rstrip(",")``,
    which reads it as 1 and 0 and rejects a faithful rewrite as numbers_changed."""
    assert numbers("It costs 1,000, not 2,000.") == {Decimal(1000), Decimal(2000)}
    assert (
        check_rewrite("It costs 1,000, not 2,000.", "Its price is 1000, not 2000.", finished=True)
        is None
    )


def test_digits_joined_by_a_comma_without_grouping_are_separate_numbers() -> None:
    """ "2,3" is not a thousands group: two numbers. Fails on: always removing commas (23)."""
    assert numbers("rows 2,3 and 4") == {Decimal(2), Decimal(3), Decimal(4)}


def test_a_number_starting_a_sentence_makes_the_next_capitalised_word_a_name() -> None:
    """After a leading number the next word is not the sentence's first word.
    Fails on: a digit keeping ``sentence_start``."""
    assert entities("2 Eiffel Towers stand here.") == ["Eiffel Towers"]


def test_a_colon_or_semicolon_starts_a_sentence() -> None:
    """_SENTENCE_END holds ":" and ";": the word after one is a sentence's first word.
    Fails on: dropping them from _SENTENCE_END."""
    assert entities("Answer: Paris is big; Rome too.") == []


def test_a_two_letter_acronym_is_an_entity_even_first_in_a_sentence() -> None:
    """ "TV" is an acronym (two capitals). Fails on: requiring three letters."""
    assert entities("TV shows it.") == ["TV"]


def test_an_entity_is_found_across_a_run_of_spaces() -> None:
    """Presence is a whole-phrase match on the other text's tokens: a double space inside
    a kept name is not a changed entity. Fails on: matching against the raw text."""
    original = "The Eiffel Tower is tall."
    assert check_rewrite(original, "The Eiffel  Tower stands tall.", finished=True) is None


# ---------------------------------------------------------------------------------------
# prompts.py


def test_the_answer_reaches_the_llm_cleaned_of_its_marker_and_whitespace() -> None:
    """The LLM never sees <image> (prompts.py docstring), in an answer either.
    Fails on: rewrite_requests not cleaning the answer."""
    default = TemplateLibrary().get("default-v1")
    requests = dict(default.rewrite_requests(Turn("<image>\nWhat is it?", "<image>\nA dog. ")))
    contents = [m["content"] for m in requests["answer"]]
    assert all("<image>" not in c for c in contents)
    assert "A dog." in contents[-1] and "A dog. " not in contents[-1]


def test_a_set_whose_last_message_is_not_the_users_is_refused(tmp_path: pathlib.Path) -> None:
    """Fails on: removing the last-message-is-user check."""
    folder = copy_default(tmp_path)
    (folder / "rewrite-question.toml").write_text(
        '[[messages]]\nrole = "user"\ncontent = "{question}"\n'
        '[[messages]]\nrole = "assistant"\ncontent = "Sure."\n'
    )
    with pytest.raises(ValueError, match=r"mine-v1/rewrite-question.toml: the last message"):
        load_set(folder)


def test_review_choices_must_differ(tmp_path: pathlib.Path) -> None:
    """Two equal labels could not tell the versions apart. Fails on: dropping the check."""
    folder = copy_default(tmp_path)
    review = folder / "review.toml"
    review.write_text(review.read_text().replace('choices = ["A", "B"]', 'choices = ["A", "A"]'))
    with pytest.raises(ValueError, match=r"review.toml: choices must be two labels"):
        load_set(folder)


def test_hidden_and_underscore_folders_are_not_sets(tmp_path: pathlib.Path) -> None:
    """A scratch folder ("_draft", ".git") beside the sets is skipped, not loaded (and
    not failed on). Fails on: loading every folder."""
    copy_default(tmp_path)
    (tmp_path / "_draft").mkdir()
    (tmp_path / ".cache").mkdir()
    assert TemplateLibrary(tmp_path).names == ["mine-v1"]
