"""The Align prompt template sets: loading, checking, hashing and rendering."""

from __future__ import annotations

import hashlib
import pathlib
import shutil

import pytest

from align2.client.types import Turn
from align2.server.core.prompts import TemplateLibrary, load_set, templates_root
from align2.server.errors import NotFound


def copy_default(tmp_path: pathlib.Path) -> pathlib.Path:
    source = pathlib.Path(str(templates_root() / "default-v1"))
    target = tmp_path / "sets" / "mine-v1"
    shutil.copytree(source, target)
    return target


def test_default_set_is_shipped_and_hashed() -> None:
    library = TemplateLibrary()
    assert "default-v1" in library.names
    default = library.get("default-v1")
    assert default.choices == ("A", "B")
    folder = pathlib.Path(str(templates_root() / "default-v1"))
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.toml")):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
    assert default.sha256 == digest.hexdigest()
    with pytest.raises(NotFound, match="unknown template set 'x'; available: default-v1"):
        library.get("x")


def test_render_inserts_text_once_and_braces_are_inert() -> None:
    default = TemplateLibrary().get("default-v1")
    messages = default.question_messages("What is {answer} in {{this}}?")
    assert messages[0]["role"] == "system"
    assert messages[-1] == {"role": "user", "content": "What is {answer} in {{this}}?"}
    review = default.review_messages(Turn("q1", "a1"), Turn("q2", "a2"))[-1]["content"]
    assert review.index("q1") < review.index("a1") < review.index("q2") < review.index("a2")


def test_an_edit_changes_the_hash(tmp_path: pathlib.Path) -> None:
    folder = copy_default(tmp_path)
    before = TemplateLibrary(folder.parent).get("mine-v1").sha256
    with (folder / "review.toml").open("a") as f:
        f.write("\n")
    assert load_set(folder).sha256 != before


@pytest.mark.parametrize(
    ("file", "text", "problem"),
    [
        (
            "rewrite-answer.toml",
            '[[messages]]\nrole = "user"\ncontent = "{answer}"\n',
            "placeholders",
        ),
        ("rewrite-question.toml", '[[messages]]\nrole = "user"\ncontent = "{q}"\n', "placeholders"),
        ("rewrite-question.toml", "[[messages]]\nrole = 'bot'\ncontent = '{question}'\n", "role"),
        ("rewrite-question.toml", "messages = []\n", "non-empty"),
        ("review.toml", "choices = ['A']\n", "choices"),
        ("review.toml", "not toml [", "review.toml"),
    ],
)
def test_malformed_sets_are_refused_naming_the_file(
    tmp_path: pathlib.Path, file: str, text: str, problem: str
) -> None:
    folder = copy_default(tmp_path)
    if file == "review.toml" and text.startswith("choices"):
        original = (folder / file).read_text()
        text = original.replace('choices = ["A", "B"]', text.strip())
    (folder / file).write_text(text)
    with pytest.raises(ValueError, match=f"template mine-v1/{file}") as info:
        load_set(folder)
    assert problem in str(info.value)
