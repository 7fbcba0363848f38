"""Writers round-trip through the readers and never leave partial files."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.data import Example, Turn, read_records, write_jsonl, write_parquet, write_records

RECORDS = [
    Example(id="a", instruction="Classify.", input="Great!", output="positive", options=("positive", "negative"),
            task="sent", source="demo", metadata={"categories": ["Sentiment Analysis"], "n": 1}),
    Example(id="b", instruction="Übersetze: 東京", output="Tokyo", references=("Tokyo", "Tōkyō"),
            history=(Turn(user="hi", assistant="hello"),), source="demo"),
]  # fmt: skip


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_round_trip(tmp_path: Path, name: str):
    assert write_records(RECORDS, tmp_path / name) == 2
    back = read_records(tmp_path / name)
    assert back.records == RECORDS


def test_real_superni_round_trip(tmp_path: Path, shared_data: Path):
    recs = read_records(shared_data / "superni/tasks/task1312_amazonreview_polarity_classification.json.gz")
    write_parquet(recs.records, tmp_path / "t.parquet")
    write_jsonl(recs.records, tmp_path / "t.jsonl")
    assert read_records(tmp_path / "t.parquet").records == recs.records
    assert read_records(tmp_path / "t.jsonl").records == recs.records


def test_failure_leaves_no_partial_file(tmp_path: Path):
    def exploding():
        yield RECORDS[0]
        raise RuntimeError("disk on fire")

    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl(exploding(), target)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_version(tmp_path: Path):
    target = tmp_path / "out.jsonl"
    write_jsonl(RECORDS, target)
    before = target.read_bytes()

    def exploding():
        yield RECORDS[1]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(exploding(), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_unknown_extension(tmp_path: Path):
    with pytest.raises(ValueError, match="use .jsonl or .parquet"):
        write_records(RECORDS, tmp_path / "x.csv")
