"""Every dataset family from ../shared/data, plus the generic formats and their error reporting."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from specialize.data import DataError, FieldMap, detect_format, read_records, read_superni_task

SENTIMENT_TASK = "superni/tasks/task1312_amazonreview_polarity_classification.json.gz"


@pytest.mark.parametrize(
    ("rel", "fmt", "count"),
    [
        ("generalist/lima/lima.json", "lima", 1029),
        ("generalist/alpaca_gpt4_sample/alpaca_en_demo.json", "alpaca", 999),
        ("generalist/alpaca_52k/alpaca_data_en_52k_derived.json.gz", "alpaca", 52002),
        ("generalist/dolly_alpaca_fixtures/dolly.json", "dolly", 12),
        ("generalist/dolly_alpaca_fixtures/alpaca.json", "alpaca", 23),
        ("generalist/self_instruct_seed/seed_tasks.jsonl", "self-instruct", 175),
        ("generalist/self_instruct_seed/user_oriented_instructions.jsonl", "self-instruct", 252),
        ("biomed/box_seeds/BoX_instructions.json", "box", 47),
        (SENTIMENT_TASK, "superni", 300),
    ],
)
def test_family_detected_and_counted(shared_data: Path, rel: str, fmt: str, count: int):
    path = shared_data / rel
    assert detect_format(path) == fmt
    result = read_records(path)
    assert len(result) == count
    assert not result.skipped
    ids = [r.id for r in result]
    assert len(set(ids)) == len(ids), "ids must be unique within a source"
    assert all(r.instruction.strip() for r in result)


def test_ids_are_stable_across_reads(shared_data: Path):
    path = shared_data / "generalist/alpaca_gpt4_sample/alpaca_en_demo.json"
    assert [r.id for r in read_records(path)] == [r.id for r in read_records(path)]
    # a content id does not depend on position: a limited read yields the same ids for the same items
    assert [r.id for r in read_records(path, limit=10)] == [r.id for r in read_records(path)][:10]


def test_lima_history_kept_as_turns(shared_data: Path):
    result = read_records(shared_data / "generalist/lima/lima.json")
    multi = [r for r in result if r.history]
    assert len(multi) == 29
    raw = json.loads((shared_data / "generalist/lima/lima.json").read_text())
    raw_multi = [r for r in raw if r.get("history")]
    assert [len(r.history) for r in multi] == [len(r["history"]) for r in raw_multi]
    assert multi[0].history[0].user == raw_multi[0]["history"][0][0]
    assert multi[0].history[0].assistant == raw_multi[0]["history"][0][1]


def test_dolly_context_becomes_input(shared_data: Path):
    result = read_records(shared_data / "generalist/dolly_alpaca_fixtures/dolly.json")
    raw = json.loads((shared_data / "generalist/dolly_alpaca_fixtures/dolly.json").read_text())
    assert [r.input for r in result] == [r["context"] for r in raw]
    assert [r.output for r in result] == [r["response"] for r in raw]
    assert [r.task for r in result] == [r["category"] for r in raw]


def test_self_instruct_seed_fields(shared_data: Path):
    result = read_records(shared_data / "generalist/self_instruct_seed/seed_tasks.jsonl")
    first = result.records[0]
    assert first.id == "seed_task_0"
    assert first.task == "breakfast_suggestion"
    assert sum(r.metadata["is_classification"] for r in result) == 26


def test_box_seeds_cover_all_32_tasks(shared_data: Path):
    result = read_records(shared_data / "biomed/box_seeds/BoX_instructions.json")
    tasks = {r.task for r in result}
    assert len(tasks) == 32
    ner = [r for r in result if r.task == "NCBI"]
    assert len(ner) == 3
    assert ner[0].instruction.startswith("In this task")
    assert "prompt" in ner[0].metadata


def test_superni_task_structure(shared_data: Path):
    task = read_superni_task(shared_data / SENTIMENT_TASK)
    raw = json.loads(gzip.decompress((shared_data / SENTIMENT_TASK).read_bytes()))
    assert task.name == "task1312_amazonreview_polarity_classification"
    assert task.definition == raw["Definition"][0]
    assert task.categories == ["Sentiment Analysis"]
    assert len(task.positive_examples) == len(raw["Positive Examples"]) == 3
    assert len(task.negative_examples) == 3
    inst = task.instances.records
    assert [r.id for r in inst] == [i["id"] for i in raw["Instances"]]
    assert {r.output for r in inst} == {"negative", "positive"}
    assert inst[0].metadata["domains"] == ["Reviews"]
    assert all(r.task == task.name and r.instruction == task.definition for r in inst)


def test_superni_all_train_tasks_keep_every_reference(shared_data: Path):
    """All 692 task files load; instance counts and multi-reference outputs match the raw JSON."""
    files = sorted((shared_data / "superni/tasks").glob("*.json.gz"))
    assert len(files) == 692
    n_records = n_raw = multi = multi_raw = 0
    for f in files:
        raw = json.loads(gzip.decompress(f.read_bytes()))
        recs = read_superni_task(f).instances.records
        n_records += len(recs)
        n_raw += len(raw["Instances"])
        multi += sum(len(r.references) > 1 for r in recs)
        multi_raw += sum(len(i["output"]) > 1 for i in raw["Instances"])
        for r, i in zip(recs, raw["Instances"], strict=True):
            assert list(r.references) == i["output"]
    assert n_records == n_raw == 182838
    assert multi == multi_raw > 0


# ----------------------------------------------------------------------------- generic formats


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_field_mapping(tmp_path: Path):
    path = _write(
        tmp_path / "qa.jsonl",
        '{"question": "2+2?", "answer": "4", "choices": ["3", "4"], "topic": "math"}\n\n'
        '{"question": "Capital of France?", "answer": "Paris", "choices": ["Paris", "Rome"], "topic": "geo"}\n',
    )
    mapping = FieldMap(instruction="question", input=None, output="answer", options="choices")
    result = read_records(path, mapping=mapping)
    assert [r.output for r in result] == ["4", "Paris"]
    assert result.records[0].options == ("3", "4")
    assert result.records[1].metadata == {"topic": "geo"}
    assert result.records[0].source == "qa"


def test_csv_with_mapping_and_json_list_cells(tmp_path: Path):
    path = _write(
        tmp_path / "s.csv",
        'sentence,label,opts\n"Profits rose, sharply.",positive,"[""positive"", ""negative""]"\n'
        "Sales fell.,negative,\n",
    )
    result = read_records(path, mapping={"instruction": "sentence", "output": "label", "input": None,
                                         "options": "opts"})  # fmt: skip
    assert [r.instruction for r in result] == ["Profits rose, sharply.", "Sales fell."]
    assert result.records[0].options == ("positive", "negative")
    assert result.records[1].options is None  # an empty cell means no options, not an error


def test_hf_dataset_from_disk(tmp_path: Path):
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": ["A", "B"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["c"], "completion": ["C"]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert detect_format(tmp_path / "ds") == "hf-disk"
    mapping = {"instruction": "prompt", "output": "completion", "input": None}
    assert [r.output for r in read_records(tmp_path / "ds", mapping=mapping)] == ["A", "B"]
    assert [r.output for r in read_records(tmp_path / "ds", mapping=mapping, split="test")] == ["C"]
    with pytest.raises(DataError, match="no split 'dev'"):
        read_records(tmp_path / "ds", mapping=mapping, split="dev")


def test_hf_hub_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import datasets.config
    import huggingface_hub.constants

    # the libraries read HF_HUB_OFFLINE at import time; patch their constants so no retries are waited out
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="hf-disk"):
        read_records("tatsu-lab/alpaca", "hf-hub")


# ----------------------------------------------------------------------------- bad input


def test_malformed_jsonl_names_line(tmp_path: Path):
    path = _write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", \n')
    with pytest.raises(DataError) as e:
        read_records(path)
    assert e.value.line == 2 and str(path) in str(e.value)


def test_missing_field_names_file_line_and_field(tmp_path: Path):
    path = _write(
        tmp_path / "a.json",
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "outptu": "d"}\n]\n',
    )
    with pytest.raises(DataError) as e:
        read_records(path, "alpaca")
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 3, "output")
    assert f"{path}:3: field 'output': missing" in str(e.value)


def test_wrong_type_and_empty_instruction(tmp_path: Path):
    path = _write(
        tmp_path / "t.jsonl",
        '{"instruction": "ok", "output": "fine"}\n'
        '{"instruction": "x", "output": {"nested": 1}}\n'
        '{"instruction": "   ", "output": "y"}\n'
        '{"instruction": "n", "output": 3}\n',
    )
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'output': expected text, got dict"):
        read_records(path)
    result = read_records(path, skip_invalid=True)
    assert [r.output for r in result] == ["fine", "3"]  # numeric labels become text
    assert [(s.line, s.field) for s in result.skipped] == [(2, "output"), (3, "instruction")]
    assert "2 records skipped" in result.skip_summary()


def test_superni_bad_instance_names_its_index(tmp_path: Path):
    task = {"Definition": ["Do it."], "Instances": [{"id": "t-1", "input": "x", "output": ["y"]},
                                                    {"id": "t-2", "input": "x", "output": []}]}  # fmt: skip
    path = _write(tmp_path / "task9_demo.json", json.dumps(task))
    with pytest.raises(DataError) as e:
        read_records(path)
    assert e.value.field == "Instances[1].output"
    result = read_records(path, skip_invalid=True)
    assert len(result) == 1 and len(result.skipped) == 1


def test_duplicate_explicit_ids_rejected(tmp_path: Path):
    path = _write(tmp_path / "d.jsonl", '{"id": "x", "instruction": "a", "output": "b"}\n' * 2)
    with pytest.raises(DataError, match="duplicate id 'x'"):
        read_records(path)


def test_exact_duplicate_content_kept_with_distinct_ids(tmp_path: Path):
    path = _write(tmp_path / "d.jsonl", '{"instruction": "a", "output": "b"}\n' * 3)
    ids = [r.id for r in read_records(path)]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_unknown_extension_and_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_records(_write(tmp_path / "x.txt", "hi"))


def test_invalid_utf8_names_line(tmp_path: Path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "c"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid UTF-8"):
        read_records(path)
