"""``align2 train-heads`` end to end on the tiny preference folder and a tiny model."""

from __future__ import annotations

import pathlib

import pytest

from align2.server import cli
from align2.server.models import heads


def test_train_heads_reports_writes_heads_and_reuses_features(
    preference_dir: pathlib.Path,
    tiny_idefics3: pathlib.Path,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALIGN2_PREFERENCE_DATA", str(preference_dir))  # instead of --data
    argv = [
        "train-heads",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--question-model",
        str(tiny_idefics3),
        "--answer-model",
        str(tiny_idefics3),
        "--evaluate-test",
        "--val-fraction",
        "0.3",
        "--out",
        str(tmp_path / "heads"),
    ]
    assert cli.main(argv) == 0
    report = capsys.readouterr().out
    for row in (
        "| question | validation | question-train.json | 3 |",
        "| question | test | question-test.json | 3 | 17 |",  # 6 + 5 + 6 pairs
        "| answer | validation | answer-dev.json |",
        "| answer | test | answer-test.json | 4 | 11 |",  # 3 + (3 + 2) + 3
    ):
        assert row in report
    # 40 candidates, 24 distinct inputs (candidates 1 and 3 repeat across groups).
    assert "features of question-train.json: 24 inputs, extracted in" in report
    for head in ("question", "answer"):
        trained = heads.load(tmp_path / "heads" / f"{head}.json")
        assert trained.backbone_revision == heads.backbone_revision(tiny_idefics3)
        assert set(trained.provenance["hyperparameters"]) == {"l2", "lr", "epochs"}
        assert len(trained.weight) == 64

    assert cli.main([*argv[:-2], "--heads", "answer"]) == 0
    again = capsys.readouterr().out
    assert "features of answer-dev.json: 45 inputs, cached" in again
    assert "| question |" not in again


def test_train_heads_needs_a_data_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGN2_PREFERENCE_DATA", raising=False)
    with pytest.raises(SystemExit, match="--data DIR"):
        cli.main(["train-heads"])
