"""`data fetch` runs the real hub-loading path on a local `save_to_disk` copy (no network here)."""

from __future__ import annotations

import json

import pytest

from specialize.cli import main
from specialize.data import DataError, read_records
from specialize.data.fetch import fetch


def test_dolly_columns_become_records_and_bad_rows_are_counted(tmp_path, capsys):
    import datasets

    rows = {
        "instruction": ["Name a fruit.", "Summarize.", None],
        "context": ["", "Long text here.", ""],
        "response": ["Apple.", "Short.", "Orphan answer."],
        "category": ["open_qa", "summarization", "open_qa"],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "dolly_copy"))
    out, result = fetch("dolly", tmp_path / "data", local=tmp_path / "dolly_copy")
    assert len(result.records) == 2 and len(result.skipped) == 1
    back = read_records(out).records
    assert [(r.instruction, r.input, r.output, r.task) for r in back] == [
        ("Name a fruit.", "", "Apple.", "open_qa"),
        ("Summarize.", "Long text here.", "Short.", "summarization"),
    ]
    assert main(["data", "fetch", "dolly", "--from", str(tmp_path / "dolly_copy"), "--out", str(tmp_path / "o")]) == 0
    assert "2 records" in capsys.readouterr().out and json.loads(
        (tmp_path / "o/dolly.jsonl").read_text().split("\n")[0]
    )


def test_offline_hub_fetch_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="save the dataset with `datasets`"):
        fetch("alpaca-gpt4", tmp_path)
    assert not (tmp_path / "alpaca-gpt4.jsonl").exists()
