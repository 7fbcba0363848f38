"""Bad input as a new user meets it: each gives a clear error naming the file (or is read correctly), never a
traceback; nothing is dropped silently."""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from specialize.cli import main
from specialize.data import read_records
from specialize.records import DataError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_task_yaml_example_works_verbatim(tmp_path: Path, monkeypatch):
    """The README's "add a task with a YAML file" block, as printed, on a CSV of its columns."""
    from specialize.eval.tasks import load_task_spec, load_tasks

    text = README.read_text()
    block = re.search(r"Add a\s+task with a YAML file.*?```yaml\n(.*?)```", text, re.S)
    assert block, "the README lost its task YAML example"
    spec = yaml.safe_load(block.group(1))
    assert spec["data"]["mapping"]["instruction"] is None and spec["data"]["instruction"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rows = [("The app crashes on start", "bug"), ("Please add dark mode", "feature"), ("How do I log in?", "question")]
    (tmp_path / "data/my_task.csv").write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    [task] = load_tasks(load_task_spec(spec, "."))
    assert [(e.input, e.output) for e in task.examples] == rows
    assert {e.instruction for e in task.examples} == {spec["data"]["instruction"]}
    assert task.options == ["bug", "feature", "question"]


def test_no_instruction_column_and_no_task_instruction_names_the_field(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello,x\n")
    with pytest.raises(DataError, match=r"t.csv:2: field 'instruction': no column is mapped"):
        read_records(path, mapping={"instruction": None, "input": "text", "output": "label"})


def test_tsv_is_read_with_tabs_and_a_delimiter_can_be_set(tmp_path: Path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("instruction\tinput\toutput\nSay it, now.\ta, b\tyes\n")
    [ex] = read_records(tsv).records
    assert (ex.instruction, ex.input, ex.output) == ("Say it, now.", "a, b", "yes")
    semi = tmp_path / "t.csv"
    semi.write_text("instruction;output\nSay it, now.;yes\n")
    [ex] = read_records(semi, mapping={"delimiter": ";"}).records
    assert (ex.instruction, ex.output) == ("Say it, now.", "yes")


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b'{"instruction": "a", "output": "b"}\n')[:20]])
def test_damaged_gzip_is_a_data_error_naming_the_file(tmp_path: Path, content: bytes, capsys):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"d.jsonl.gz: not a readable gzip file"):
        read_records(path, "jsonl")
    assert main(["data", "inspect", str(path)]) == 1
    assert f"error: {path}" in capsys.readouterr().err


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path):
    csv_path = tmp_path / "b.csv"
    csv_path.write_bytes("\ufeffinstruction,output\nSay hi.,hi\n".encode())
    result = read_records(csv_path, skip_invalid=True)
    assert [e.instruction for e in result.records] == ["Say hi."] and not result.skipped
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes('\ufeff{"instruction": "Say hi.", "output": "hi"}\n'.encode())
    assert [e.output for e in read_records(jsonl).records] == ["hi"]


def test_skip_invalid_skips_malformed_json_lines_and_counts_them(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n[1, 2]\n')
    with pytest.raises(DataError, match="m.jsonl:2: malformed JSON"):
        read_records(path)
    result = read_records(path, skip_invalid=True)
    assert len(result.records) == 1
    assert [(s.line, s.message.split(":")[0]) for s in result.skipped] == [
        (2, "malformed JSON"),
        (3, "expected a JSON object, got list"),
    ]


def test_train_prints_every_skipped_record(tmp_path: Path, tiny_model_dir, capsys):
    from specialize.train import TrainConfig, run_training

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(4))
                    + '{"instruction": "broken"\n')  # fmt: skip
    stage = {"name": "s", "sources": [{"path": str(data), "skip_invalid": True}], "epochs": 1, "batch_size": 4,
             "micro_batch_size": 4, "max_length": 32}  # fmt: skip
    model = {"spec": str(tiny_model_dir), "dtype": "float32"}
    cfg = TrainConfig.model_validate({"model": model, "stages": [stage], "output_dir": str(tmp_path / "o"),
                                      "save_every": 0, "progress": False})  # fmt: skip
    run_training(cfg)
    out = capsys.readouterr().out
    assert "skipped 1 records" in out and f"{data}:5: malformed JSON" in out


def test_a_gguf_that_is_not_gguf_is_a_clear_error(tmp_path: Path, capsys):
    from specialize.models import ModelLoadError, resolve

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve(str(fake))
    assert main(["generate", "--model", str(fake), "hi"]) == 1
    assert f"error: {fake}: not a GGUF file" in capsys.readouterr().err


def test_clear_errors_instead_of_tracebacks(tmp_path: Path, capsys, monkeypatch):
    import specialize.models

    monkeypatch.setattr(specialize.models, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    assert main(["eval", "--task", "fpb", "--set", "limit=[1,2"]) == 1
    assert "not valid YAML" in capsys.readouterr().err
    bad = tmp_path / "x.parquet"
    bad.write_text("instruction,output\na,b\n")
    assert main(["data", "inspect", str(bad)]) == 1
    assert f"error: {bad}: not a readable Parquet file" in capsys.readouterr().err
    assert main(["eval", "--task", "fpb", "--shots", "-1"]) == 1
    assert "shots.0" in capsys.readouterr().err
    assert main(["generate", "--temperature", "-1", "hi"]) == 1
    assert "--temperature" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "no results store" in capsys.readouterr().err


def test_artifacts_respect_the_umask(tmp_path: Path):
    from specialize.io import atomic_path, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "d", is_dir=True) as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_a_hub_id_offline_fails_before_any_download_attempt(monkeypatch):
    import huggingface_hub.constants
    import transformers

    from specialize.models import ModelLoadError, load_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("tried the hub while offline"))  # fmt: skip
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("someone/not-cached-model-xyz")


def test_loading_a_model_prints_no_library_progress_bar(tiny_model_dir, capfd):
    from specialize.models import load_model

    load_model(str(tiny_model_dir))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err
