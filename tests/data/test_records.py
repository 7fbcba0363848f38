from __future__ import annotations

import pytest
from pydantic import ValidationError

from specialize.data import DataError, Example


def test_references_default_to_output():
    ex = Example(id="1", instruction="Say hi.", output="hi")
    assert ex.references == ("hi",)


def test_references_must_start_with_output():
    with pytest.raises(ValidationError, match="references\\[0\\] must equal output"):
        Example(id="1", instruction="x", output="a", references=("b", "a"))


@pytest.mark.parametrize("bad", [{"instruction": "  "}, {"id": ""}, {"options": ("a", "a")}, {"extra": 1}])
def test_invalid_records_rejected(bad):
    fields = {"id": "1", "instruction": "x", "output": "a", **bad}
    with pytest.raises(ValidationError):
        Example(**fields)


def test_records_are_immutable():
    ex = Example(id="1", instruction="x", output="a")
    with pytest.raises(ValidationError):
        ex.output = "b"


def test_data_error_message():
    e = DataError("f.jsonl", 7, "output", "missing")
    assert str(e) == "f.jsonl:7: field 'output': missing"
    assert str(DataError("f.json", None, None, "bad")) == "f.json: bad"
