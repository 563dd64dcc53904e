"""The resume file of offline curation: keys, append-and-reload, a truncated last line."""

from __future__ import annotations

import json
import pathlib

from align2.client import Sample, Turn
from align2.client.scorestore import ScoreKey, Scorer, ScoreStore, sample_digest


def key(sample_id: str = "1", revision: str = "r1", head: str = "question") -> ScoreKey:
    return Scorer(head, revision, "t1").key(sample_id, "d" * 32)


def test_scores_are_appended_and_read_back_exactly(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.jsonl"
    with ScoreStore(path) as store:
        store.add([(key("1"), 0.1 + 0.2), (key("2", head="answer"), [1.5, -2.25])])
    with ScoreStore(path) as store:
        assert store.loaded == 2 and store.ignored_lines == 0
        assert store.get(key("1")) == 0.1 + 0.2  # the same float, bit for bit
        assert store.get(key("2", head="answer")) == (1.5, -2.25)
        assert store.get(key("2")) is None  # another head
        assert store.get(key("1", revision="r9")) is None  # another model revision
        assert store.get(Scorer("question", "r1", "t2").key("1", "d" * 32)) is None
        assert store.get(Scorer("question", "r1", "t1", "s9").key("1", "d" * 32)) is None


def test_a_line_from_before_settings_were_keyed_matches_no_server_settings(
    tmp_path: pathlib.Path,
) -> None:
    """A file written before ModelRef.settings existed: its lines read (not counted as
    unreadable), but their scores are not reused by a server that reports settings."""
    path = tmp_path / "s.jsonl"
    old = {"id": "1", "digest": "d" * 32, "head": "question", "revision": "r1"}
    path.write_text(json.dumps({**old, "template_version": "t1", "score": 0.5}) + "\n")
    with ScoreStore(path) as store:
        assert store.loaded == 1 and store.ignored_lines == 0
        assert store.get(Scorer("question", "r1", "t1", "s1").key("1", "d" * 32)) is None
        assert store.get(Scorer("question", "r1", "t1").key("1", "d" * 32)) == 0.5


def test_a_score_is_not_reused_for_an_image_file_of_another_size(tmp_path: pathlib.Path) -> None:
    """The image file's size is stored beside the digest (of its name): another image
    under the same name is scored again; a line of an older file, without a size, is
    reused whatever the size."""
    path = tmp_path / "s.jsonl"
    scorer = Scorer("question", "r1", "t1")
    with ScoreStore(path) as store:
        store.add([(scorer.key("1", "d" * 32, 1000), 0.5)])
    assert json.loads(path.read_text())["image_size"] == 1000
    with path.open("a") as f:  # an older line, and lines whose size is not a size
        old = {"id": "2", "digest": "d" * 32, "head": "question", "revision": "r1",
               "template_version": "t1", "score": 0.25}  # fmt: skip
        f.write(json.dumps(old) + "\n")
        for size in (-1, "1000", True, 1.5):
            f.write(json.dumps({**old, "id": "3", "image_size": size}) + "\n")
    with ScoreStore(path) as store:
        assert store.loaded == 2 and store.ignored_lines == 4
        assert store.get(scorer.key("1", "d" * 32, 1000)) == 0.5
        assert store.get(scorer.key("1", "d" * 32, 1001)) is None
        assert store.get(scorer.key("1", "d" * 32)) == 0.5  # the size unknown (in memory)
        assert store.get(scorer.key("2", "d" * 32, 77)) == 0.25
        store.add([(scorer.key("1", "d" * 32, 1001), 0.75)])  # scored again: the new one
        assert store.get(scorer.key("1", "d" * 32, 1001)) == 0.75
    with ScoreStore(path) as store:
        assert store.get(scorer.key("1", "d" * 32, 1001)) == 0.75
        assert store.get(scorer.key("1", "d" * 32, 1000)) is None


def test_candidate_scores_are_stored_per_turn_and_read_back(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.jsonl"
    answer = key("3", head="answer")
    with ScoreStore(path) as store:
        store.add([(answer, [[0.5, 1.25, 0.5], -0.25, [2.0]])])
    line = json.loads(path.read_text())
    assert line["scores"] == [[0.5, 1.25, 0.5], -0.25, [2.0]]  # a list: the turn's candidates
    with ScoreStore(path) as store:
        assert store.loaded == 1
        assert store.get(answer) == ((0.5, 1.25, 0.5), -0.25, (2.0,))
    with path.open("a") as f:  # a turn with an empty list of candidates is unreadable
        f.write(json.dumps({**line, "id": "4", "scores": [[], 1.0]}) + "\n")
    with ScoreStore(path) as store:
        assert store.loaded == 1 and store.ignored_lines == 1


def test_a_truncated_last_line_is_dropped_and_appending_goes_on(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.jsonl"
    with ScoreStore(path) as store:
        store.add([(key("1"), 1.0), (key("2"), 2.0)])
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # a crash in the middle of the second line
    with ScoreStore(path) as store:
        assert store.loaded == 1 and store.ignored_lines == 0
        assert store.get(key("2")) is None
        store.add([(key("2"), 2.0)])
    assert path.read_bytes() == whole  # the fragment is gone, not glued to the new line
    with ScoreStore(path) as store:
        assert store.get(key("1")) == 1.0 and store.get(key("2")) == 2.0


def test_a_file_of_one_truncated_line_is_emptied(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "1", "dig')
    with ScoreStore(path) as store:
        assert store.loaded == 0
    assert path.read_text() == ""


def test_unreadable_lines_are_ignored_and_counted(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.jsonl"
    good = {
        "id": "1",
        "digest": "d" * 32,
        "head": "question",
        "revision": "r1",
        "template_version": "t1",
        "score": 3.0,
    }
    lines = [
        json.dumps(good),
        "not json",
        json.dumps({**good, "score": "high"}),
        json.dumps({**good, "head": "answer", "scores": []}),
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    with ScoreStore(path) as store:
        assert store.loaded == 1 and store.ignored_lines == 3
        assert store.get(key("1")) == 3.0


def test_the_digest_follows_what_is_scored() -> None:
    base = Sample(
        id="1", image=pathlib.Path("/x/a.jpg"), turns=[Turn("Q?", "A.")], image_file="a.jpg"
    )
    same = Sample(
        id="1",
        image=pathlib.Path("/y/a.jpg"),
        turns=[Turn("Q?", "A.")],
        image_file="a.jpg",
        task="detail",
        extra={"k": 1},
    )
    assert sample_digest(base) == sample_digest(same)  # folder, task, extra keys: no matter
    other_answer = Sample(id="1", image=base.image, turns=[Turn("Q?", "B.")], image_file="a.jpg")
    other_image = Sample(id="1", image=base.image, turns=base.turns, image_file="b.jpg")
    assert len({sample_digest(s) for s in (base, other_answer, other_image)}) == 3
    in_memory = Sample(id="1", image=b"png", turns=base.turns)
    assert sample_digest(in_memory) != sample_digest(Sample("1", b"gif", base.turns))
    # Candidates are part of what is scored; a sample without them hashes as before them
    # (the digest main computed), so older scores files stay valid.
    assert sample_digest(base) == "9708bad83f5ddce426ae1c9abdee89ec"
    with_candidates = [
        Sample("1", base.image, [Turn("Q?", candidates=c)], image_file="a.jpg")
        for c in (("A.", "B."), ("B.", "A."), ("A.",))
    ]
    digests = {sample_digest(s) for s in (base, *with_candidates)}
    assert len(digests) == 4


def test_a_boolean_score_line_is_ignored(tmp_path: pathlib.Path) -> None:
    """JSON true is not a score. Fails on: no bool check in _number (true read as 1.0)."""
    path = tmp_path / "s.jsonl"
    entry = {"id": "1", "digest": "d" * 32, "head": "question", "revision": "r1",
             "template_version": "t1", "score": True}  # fmt: skip
    path.write_text(json.dumps(entry) + "\n")
    with ScoreStore(path) as store:
        assert store.loaded == 0 and store.ignored_lines == 1
        assert store.get(key("1")) is None
