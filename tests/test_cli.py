"""The CLI adds parsing only: these drive it as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specialize.cli import main

SENTIMENT = "superni/tasks/task1312_amazonreview_polarity_classification.json.gz"


def test_help_lists_stages():
    out = subprocess.run([sys.executable, "-m", "specialize.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "data" in out.stdout and "generate" in out.stdout


def test_data_inspect_json(shared_data: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["data", "inspect", str(shared_data / SENTIMENT), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 300 and stats["tasks"] == 1 and stats["with_input"] == 300
    tokens = stats["tokens"]
    assert tokens["response"]["max"] == 2  # "positive"/"negative" are one token each, plus EOS
    assert 0 < tokens["prompt"]["p50"] <= tokens["prompt"]["p90"] <= tokens["prompt"]["max"]
    assert tokens["total"]["max"] <= tokens["prompt"]["max"] + tokens["response"]["max"]


def test_data_inspect_pretty_shows_rendered_prompt(shared_data: Path, capsys):
    assert main(["data", "inspect", str(shared_data / "generalist/lima/lima.json"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "1029 records" in out and "with history: 29" in out
    assert "### Instruction:" in out and "### Response:" in out


def test_data_inspect_reports_skips(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    assert main(["data", "inspect", str(bad)]) == 1
    assert f"{bad}:2: field 'output': missing" in capsys.readouterr().err
    assert main(["data", "inspect", str(bad), "--skip-invalid", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 1 and stats["skipped"] == 1


def test_data_inspect_field_mapping(tmp_path: Path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "2+2?", "a": "4"}\n')
    assert main(["data", "inspect", str(path), "--map", "instruction=q", "--map", "output=a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 1


def test_generate_prints_completion(capsys):
    rc = main(["generate", "--max-new-tokens", "16", "What is the capital of France? Answer in one word."])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_bad_model_is_a_clear_error(capsys):
    assert main(["generate", "--model", "./no/such/model.gguf", "hi"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
