"""LLaVA files <-> Sample: markers, tasks, malformed records, and exact round trips."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import tempfile
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align2.client import (
    ImageMarker,
    Sample,
    Turn,
    choose_candidates,
    llava,
    read_llava,
    write_llava,
)
from align2.client.llava import (
    iter_llava,
    iter_records,
    join_image_marker,
    split_image_marker,
)

RECORD = {
    "id": "000000215677",
    "image": "000000215677.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is the cat doing?"},
        {"from": "gpt", "value": "It sleeps."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "On a sofa."},
    ],
}


def write_json(path: pathlib.Path, records: list[Any]) -> pathlib.Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def with_first_question(value: str) -> dict[str, Any]:
    record = json.loads(json.dumps(RECORD))
    record["conversations"][0]["value"] = value
    return record


def test_reads_a_standard_record(tmp_path: pathlib.Path) -> None:
    path = write_json(tmp_path / "conversation_58k.json", [{**RECORD, "source": "coco"}])
    [sample] = read_llava(path, image_folder=tmp_path / "images")
    assert sample.id == "000000215677"
    assert sample.turns == [
        Turn("What is the cat doing?", "It sleeps."),
        Turn("Where?", "On a sofa."),
    ]
    assert sample.image_marker is ImageMarker.START
    assert sample.image == tmp_path / "images" / "000000215677.jpg"
    assert sample.image_file == "000000215677.jpg"
    assert sample.task == "conversation"
    assert sample.extra == {"source": "coco"}


def test_image_path_is_read_lazily(tmp_path: pathlib.Path) -> None:
    path = write_json(tmp_path / "data.json", [RECORD])
    [sample] = read_llava(path, image_folder=tmp_path)  # the image does not exist yet
    (tmp_path / "000000215677.jpg").write_bytes(b"jpeg")
    assert sample.image_bytes() == b"jpeg"


def test_image_name_without_folder_is_kept_as_given(tmp_path: pathlib.Path) -> None:
    [sample] = read_llava(write_json(tmp_path / "data.json", [RECORD]))
    assert sample.image == pathlib.Path("000000215677.jpg")


@pytest.mark.parametrize(
    ("value", "question", "marker"),
    [
        ("<image>\nWhat?", "What?", ImageMarker.START),
        ("What?\n<image>", "What?", ImageMarker.END),
        ("What?", "What?", ImageMarker.NONE),
        ("What <image> is it?", "What <image> is it?", ImageMarker.NONE),
        ("<image>What?", "<image>What?", ImageMarker.NONE),
        ("<image>\n", "", ImageMarker.START),
    ],
)
def test_image_marker(tmp_path: pathlib.Path, value: str, question: str, marker: str) -> None:
    [sample] = read_llava(write_json(tmp_path / "d.json", [with_first_question(value)]))
    assert (sample.turns[0].question, sample.image_marker) == (question, marker)


def test_marker_only_counts_in_the_first_question(tmp_path: pathlib.Path) -> None:
    record = json.loads(json.dumps(RECORD))
    record["conversations"][2]["value"] = "<image>\nWhere?"
    [sample] = read_llava(write_json(tmp_path / "d.json", [record]))
    assert sample.turns[1].question == "<image>\nWhere?"


def test_reads_jsonl_with_blank_lines(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "detail_23k.jsonl"
    line = json.dumps(RECORD)
    path.write_text(f"\n{line}\n\n{json.dumps({**RECORD, 'id': '2'})}\n", encoding="utf-8")
    samples = read_llava(path)
    assert [s.id for s in samples] == ["000000215677", "2"]
    assert {s.task for s in samples} == {"detail"}


def test_task_precedence(tmp_path: pathlib.Path) -> None:
    records = [
        {**RECORD, "task": "own"},
        {**RECORD, "type": "typed"},
        RECORD,
    ]
    path = write_json(tmp_path / "complex_reasoning_77k.json", records)
    assert [s.task for s in read_llava(path)] == ["own", "typed", "complex_reasoning"]
    assert [s.task for s in read_llava(path, task="given")] == ["own", "typed", "given"]
    assert read_llava(write_json(tmp_path / "mix.json", [RECORD]))[0].task == ""


def test_text_only_record(tmp_path: pathlib.Path) -> None:
    record = {
        "id": "t",
        "conversations": [{"from": "human", "value": "Hi"}, RECORD["conversations"][1]],
    }
    [sample] = read_llava(write_json(tmp_path / "d.json", [record]))
    assert (sample.image, sample.image_file, sample.image_marker) == (b"", None, ImageMarker.NONE)
    out = tmp_path / "out.json"
    write_llava([sample], out)
    assert json.loads(out.read_text()) == [record]


def test_integer_ids_are_read_as_strings(tmp_path: pathlib.Path) -> None:
    [sample] = read_llava(write_json(tmp_path / "d.json", [{**RECORD, "id": 7}]))
    assert sample.id == "7"


def conversation(*messages: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"from": role, "value": value} for role, value in messages]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"conversations": conversation(("human", "q"), ("gpt", []))},
            r"record 1 \(id 'x'\): conversations\[1\]\.value: an empty list",
        ),
        (
            {"conversations": conversation(("human", "q"), ("gpt", ["a", 3]))},
            r"record 1 \(id 'x'\): conversations\[1\]\.value\[1\]: expected a string, got int",
        ),
        (
            {"conversations": conversation(("human", ["q", "r"]), ("gpt", "a"))},
            r"record 1 \(id 'x'\): conversations\[0\]\.value: expected a string, got list",
        ),
        (
            {"conversations": conversation(("human", "q"), ("gpt", "a"), ("human", "q2"))},
            r"record 1 \(id 'x'\): conversations: 3 messages; expected human/gpt pairs",
        ),
        (
            {"conversations": conversation(("gpt", "a"), ("human", "q"))},
            r"record 1 \(id 'x'\): conversations\[0\]\.from: expected 'human'",
        ),
        (
            {"conversations": conversation(("human", "q"), ("human", "q"))},
            r"conversations\[1\]\.from: expected 'gpt'",
        ),
        ({"conversations": []}, r"conversations: expected a non-empty list"),
        (
            {"conversations": conversation(("human", 3), ("gpt", "a"))},
            r"\[0\]\.value: expected a string",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q", "weight": 1},
                    {"from": "gpt", "value": "a"},
                ]
            },
            r"conversations\[0\]: expected exactly the keys 'from' and 'value'",
        ),
        ({"image": ["a.jpg", "b.jpg"]}, r"record 1 \(id 'x'\): image: expected a file name"),
        ({"task": 3}, r"task: expected a string"),
        ({"id": None}, r"record 1: id: expected a string"),
    ],
)
def test_malformed_records_name_record_and_key(
    tmp_path: pathlib.Path, change: dict[str, Any], expected: str
) -> None:
    path = write_json(tmp_path / "d.json", [RECORD, {**RECORD, "id": "x", **change}])
    with pytest.raises(ValueError, match=expected) as raised:
        read_llava(path)
    assert str(path) in str(raised.value)


def test_missing_id_and_non_object(tmp_path: pathlib.Path) -> None:
    missing = {k: v for k, v in RECORD.items() if k != "id"}
    with pytest.raises(ValueError, match="record 0: id: missing"):
        read_llava(write_json(tmp_path / "a.json", [missing]))
    with pytest.raises(ValueError, match="record 0: record: expected an object, got list"):
        read_llava(write_json(tmp_path / "b.json", [[1]]))


def test_invalid_json_names_the_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        read_llava(path)


def test_iter_llava_streams(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORD) + "\nnot json\n", encoding="utf-8")
    samples = iter_llava(path)
    assert next(samples).id == RECORD["id"]  # the bad second line is not read yet
    with pytest.raises(ValueError):
        next(samples)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_format_follows_suffix(tmp_path: pathlib.Path, suffix: str) -> None:
    [sample] = read_llava(write_json(tmp_path / "in.json", [RECORD]))
    out = tmp_path / f"out{suffix}"
    assert write_llava([sample, sample], out) == 2
    text = out.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        assert [json.loads(line) for line in text.split("\n") if line] == [RECORD, RECORD]
    else:
        assert json.loads(text) == [RECORD, RECORD]


def test_write_empty_json_list(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.json"
    write_llava([], out)
    assert read_llava(out) == []


def test_write_is_atomic(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.json"
    out.write_text("[]", encoding="utf-8")
    good = Sample(id="1", image=pathlib.Path("a.jpg"), turns=[Turn("q", "a")])
    unnamed = Sample(id="2", image=b"png bytes", turns=[Turn("q", "a")])
    with pytest.raises(ValueError, match="sample '2': image: bytes without image_file"):
        write_llava([good, unnamed], out)
    assert out.read_text(encoding="utf-8") == "[]"
    assert list(tmp_path.iterdir()) == [out]


def test_write_to_a_path_that_is_not_a_regular_file_writes_to_it(tmp_path: pathlib.Path) -> None:
    """``--out /dev/null`` or a FIFO is written as it is, as the CLI's other outputs are:
    before, the atomic replace put a regular file in its place (run as root, ``--out
    /dev/null`` replaced the machine's /dev/null with the kept samples)."""
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    [sample] = read_llava(write_json(tmp_path / "in.json", [RECORD]))
    assert write_llava([sample], fifo) == 1
    reader.join(timeout=10)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(got[0]) == [RECORD]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.json"]


def test_write_rejects_extra_keys_that_clash(tmp_path: pathlib.Path) -> None:
    sample = Sample(id="1", image=pathlib.Path("a.jpg"), turns=[], extra={"id": "2"})
    with pytest.raises(ValueError, match=r"extra: keys \['id'\]"):
        write_llava([sample], tmp_path / "out.json")


def test_a_list_valued_gpt_is_the_turns_candidates_and_the_kept_best_is_written_alone(
    tmp_path: pathlib.Path,
) -> None:
    record = {
        "id": "7",
        "image": "7.jpg",
        "conversations": conversation(
            ("human", "<image>\nWhat is it?"),
            ("gpt", ["A cat.", "A grey cat.", "A dog."]),
            ("human", "Where?"),
            ("gpt", "On a sofa."),
            ("human", "Why?"),
            ("gpt", ["It is warm."]),  # one candidate is still a list
        ),
    }
    source = write_json(tmp_path / "in.json", [record])
    [sample] = read_llava(source)
    assert sample.turns == [
        Turn("What is it?", candidates=("A cat.", "A grey cat.", "A dog.")),
        Turn("Where?", "On a sofa."),
        Turn("Why?", candidates=("It is warm.",)),
    ]
    assert sample.has_candidates and sample.turns[0].answers[2] == "A dog."
    write_llava([sample], tmp_path / "same.json")
    assert read_records(tmp_path / "same.json") == [record]  # candidates written back as lists
    kept = choose_candidates(sample, [1, 0, 0])
    write_llava([kept], tmp_path / "kept.json")
    [written] = read_records(tmp_path / "kept.json")
    assert [m["value"] for m in written["conversations"]] == [
        "<image>\nWhat is it?",
        "A grey cat.",
        "Where?",
        "On a sofa.",
        "Why?",
        "It is warm.",
    ]
    with pytest.raises(ValueError, match="2 best candidates for 3 turns"):
        choose_candidates(sample, [0, 0])


def test_constructed_samples_write_their_image_path(tmp_path: pathlib.Path) -> None:
    sample = Sample(id="1", image=pathlib.Path("imgs/a.jpg"), turns=[Turn("q", "a")])
    out = tmp_path / "out.jsonl"
    write_llava([sample], out)
    assert json.loads(out.read_text())["image"] == str(pathlib.Path("imgs/a.jpg"))
    assert json.loads(out.read_text())["conversations"][0]["value"] == "<image>\nq"


# ---------------------------------------------------------------------------------------
# Round trips (property tests)

text = st.text(max_size=20)
questions = st.builds(
    lambda before, body, after: before + body + after,
    st.sampled_from(["", "<image>\n", "<image>", "\n", "\n<image>\n"]),
    text,
    st.sampled_from(["", "\n<image>", "<image>", "\n"]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
extra_keys = text.filter(lambda key: key not in {"id", "image", "conversations", "task", "type"})


@st.composite
def llava_records(draw: st.DrawFn) -> dict[str, Any]:
    answers = text | st.lists(text, min_size=1, max_size=3)  # one answer, or candidates
    turns = draw(st.lists(st.tuples(questions, answers), min_size=1, max_size=3))
    record: dict[str, Any] = {"id": draw(text)}
    if draw(st.booleans()):
        record["image"] = draw(text.filter(bool))
    record["conversations"] = [
        message
        for question, answer in turns
        for message in ({"from": "human", "value": question}, {"from": "gpt", "value": answer})
    ]
    record.update(draw(st.dictionaries(extra_keys, json_values, max_size=3)))
    if draw(st.booleans()):
        record[draw(st.sampled_from(["task", "type"]))] = draw(text)
    return record


@settings(max_examples=150, deadline=None)
@given(records=st.lists(llava_records(), max_size=4), suffix=st.sampled_from([".json", ".jsonl"]))
def test_read_write_round_trip_gives_back_equal_records(
    records: list[dict[str, Any]], suffix: str
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        source = write_json(pathlib.Path(folder) / f"in{suffix}", records)
        samples = read_llava(source, image_folder="images")
        out = pathlib.Path(folder) / f"out{suffix}"
        write_llava(samples, out)
        assert read_records(out) == records
        assert read_llava(out, image_folder="images") == samples


def read_records(path: pathlib.Path) -> list[Any]:
    content = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        # Split on "\n" only: str.splitlines also splits on U+0085, U+2028, ... inside strings.
        return [json.loads(line) for line in content.split("\n") if line]
    return json.loads(content)


@given(question=st.text())
def test_split_and_join_marker_are_inverse(question: str) -> None:
    assert join_image_marker(*split_image_marker(question)) == question


@given(question=st.text())
def test_start_marker_is_always_recovered(question: str) -> None:
    joined = join_image_marker(question, ImageMarker.START)
    assert split_image_marker(joined) == (question, ImageMarker.START)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(JSON_VALUES, max_size=6),
    spacing=st.sampled_from(["", " ", "\n  ", "\t"]),
    chunk=st.integers(1, 9),
    cut=st.integers(0, 3),
)
def test_a_json_list_is_read_element_by_element_as_json_load_reads_it(
    values: list[Any], spacing: str, chunk: int, cut: int
) -> None:
    """The list is read in chunks (here of 1-9 characters, so that elements, numbers and
    strings straddle them); the elements are json.load's, and a text json.load refuses
    (here: the last 0-3 characters cut off) is refused too, naming the file."""
    text = spacing + "[" + spacing + ("," + spacing).join(map(json.dumps, values)) + "]" + spacing
    text = text[: max(len(text) - cut, text.index("[") + 1)]  # never the "[" itself
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "list.json"
        path.write_text(text, encoding="utf-8")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(llava, "_READ_CHARS", chunk)
            try:
                expected = json.loads(text)
            except json.JSONDecodeError:
                with pytest.raises(ValueError, match=r"list\.json: not valid JSON"):
                    list(iter_records(path))
                return
            assert list(iter_records(path)) == expected


@pytest.mark.parametrize(
    "text", ["[1,]", "[1 2]", "[1] x", "[{}", '["a"', "[", "[,1]", "[1,,2]", "[tru]"]
)
def test_json_lists_json_load_refuses_are_refused(tmp_path: pathlib.Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        list(iter_records(path))


def test_task_key_wins_over_type_key(tmp_path: pathlib.Path) -> None:
    """Fails on: reading ``type`` before ``task``."""
    [sample] = read_llava(write_json(tmp_path / "d.json", [{**RECORD, "task": "a", "type": "b"}]))
    assert sample.task == "a"


def test_an_empty_task_key_falls_back(tmp_path: pathlib.Path) -> None:
    """An empty ``task`` is no task: ``type``, then the file name, decide.
    Fails on: returning the first key present even when empty."""
    records = [{**RECORD, "task": "", "type": "typed"}, {**RECORD, "task": ""}]
    path = write_json(tmp_path / "conversation_58k.json", records)
    assert [s.task for s in read_llava(path)] == ["typed", "conversation"]


def test_an_empty_image_name_is_malformed(tmp_path: pathlib.Path) -> None:
    """Fails on: accepting "" (the image folder itself would be sent as the image)."""
    message = r"record 0 \(id '000000215677'\): image: expected a file name"
    with pytest.raises(ValueError, match=message):
        read_llava(write_json(tmp_path / "d.json", [{**RECORD, "image": ""}]))


def test_a_boolean_id_is_malformed(tmp_path: pathlib.Path) -> None:
    """true is not an id (it would be written back as "True"). Fails on: no bool check."""
    with pytest.raises(ValueError, match=r"record 0: id: expected a string, got bool"):
        read_llava(write_json(tmp_path / "d.json", [{**RECORD, "id": True}]))


def test_an_upper_case_jsonl_suffix_writes_jsonl(tmp_path: pathlib.Path) -> None:
    """Fails on: a case-sensitive suffix check."""
    [sample] = read_llava(write_json(tmp_path / "d.json", [RECORD]))
    out = tmp_path / "OUT.JSONL"
    write_llava([sample], out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [RECORD]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_tolerated(tmp_path: pathlib.Path, suffix: str) -> None:
    """Some editors write a BOM. Fails on: reading as plain utf-8."""
    text = json.dumps([RECORD]) if suffix == ".json" else json.dumps(RECORD) + "\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes("\ufeff".encode() + text.encode())
    assert [s.id for s in read_llava(path)] == ["000000215677"]
