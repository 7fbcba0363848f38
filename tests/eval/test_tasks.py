"""The shipped task catalogue on the real data, k-shot demonstrations, and early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specialize.config import ConfigError
from specialize.eval.tasks import catalogue, load_task_spec, load_tasks, read_split_file, with_demos

EXPECTED = {  # catalogue task -> (examples evaluated, size of the full set it draws from)
    "fpb": (200, 4846),
    "pubmedqa": (100, 500),
    "pubmedqa_long": (100, 500),
    "ncbi_disease": (100, 940),
    "anatem": (100, 3830),
    "nq_open": (200, 3610),
    "webquestions": (200, 2032),
    "snli": (200, 9842),
    "commonsenseqa": (200, 1221),
    "aqua": (200, 254),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalogue_task_loads_real_data(name: str, shared_data: Path):
    spec = load_task_spec(name, str(shared_data), {"limit": None})
    [full] = load_tasks(spec)
    n, total = EXPECTED[name]
    assert len(full.examples) == total
    [task] = load_tasks(load_task_spec(name, str(shared_data)))
    assert len(task.examples) == n
    for e in task.examples:
        assert e.instruction and e.references
        if spec.protocol == "options":
            assert e.output in (task.options or e.options)


def test_pubmedqa_uses_the_official_test_ids(shared_data: Path):
    [task] = load_tasks(load_task_spec("pubmedqa", str(shared_data), {"limit": None}))
    truth = json.loads((shared_data / "biomed/pubmedqa/test_ground_truth.json").read_text())
    assert {e.metadata["pmid"] for e in task.examples} == set(truth)
    assert all(e.output == truth[e.metadata["pmid"]] for e in task.examples)


def test_ner_sentences_and_entities(shared_data: Path):
    [task] = load_tasks(load_task_spec("ncbi_disease", str(shared_data), {"limit": None}))
    with_entities = [e for e in task.examples if e.output != "None"]
    assert with_entities and all("disease" in e.instruction for e in task.examples)
    first = next(e for e in task.examples if "ataxia - telangiectasia" in e.output)
    assert first.metadata["entities"][0] == "ataxia - telangiectasia"


def test_superni_category_expands_to_tasks_with_task_level_options(shared_data: Path):
    # 42 sentiment tasks; two have a single distinct output (nothing to rank) and are left out, with a warning
    with pytest.warns(UserWarning, match="left out 2 task.*task512_twitter_emotion_classification"):
        tasks = load_tasks(load_task_spec("superni_sentiment", str(shared_data)))
    assert len(tasks) == 40 and tasks[0].metadata["left_out"] == [
        "task512_twitter_emotion_classification", "task902_deceptive_opinion_spam_classification"]  # fmt: skip
    single = load_task_spec("superni_sentiment", str(shared_data))
    single = single.model_copy(
        update={"superni": single.superni.model_copy(update={"tasks": ["task512_twitter_emotion_classification"]})}
    )
    with pytest.raises(ConfigError, match="task512.*nothing to rank"):
        load_tasks(single)
    t1312 = next(t for t in tasks if t.name == "task1312_amazonreview_polarity_classification")
    assert t1312.options == ["negative", "positive"]
    assert len(t1312.examples) == 100 and len(t1312.demos) == 3
    raw_first = [
        e.id for e in load_tasks(load_task_spec("superni_sentiment", str(shared_data), {"limit": None}))[0].examples
    ]
    assert [e.id for e in tasks[0].examples] == raw_first[:100]  # first 100 instances, as the official protocol


def test_kshot_never_includes_the_test_example(shared_data: Path):
    [task] = load_tasks(load_task_spec("commonsenseqa", str(shared_data), {"limit": 50}))
    for e in task.examples:
        for k in (1, 5):
            shot = with_demos(e, task.demos, k, seed=0)
            ids = shot.metadata["demo_ids"]
            assert len(ids) == k and e.id not in ids
            assert shot.instruction.count("Example ") == k and shot.input == e.input
            assert with_demos(e, task.demos, k, seed=0) == shot  # seeded
    assert with_demos(task.examples[0], task.demos, 0, 0) == task.examples[0]


def test_kshot_excludes_duplicates_of_the_test_example():
    from specialize.data import Example

    e = Example(id="t", instruction="x", input="same", output="y")
    twins = [Example(id=f"d{i}", instruction="x", input="same", output="y") for i in range(3)]
    with pytest.raises(ConfigError, match="only 0 demonstrations"):
        with_demos(e, [e, *twins], 1, 0)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"name": "t", "protocol": "options"}, "exactly one of"),
        ({"name": "t", "data": {"path": "x.jsonl"}, "metrics": ["bleu"]}, "unknown metrics"),
        ({"name": "bad name", "data": {"path": "x.jsonl"}}, "name"),
    ],
)
def test_bad_task_specs(task, message):
    with pytest.raises(ConfigError, match=message):
        load_task_spec(task, ".")


def test_bad_task_data_fails_before_models(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n')
    spec = load_task_spec({"name": "t", "data": {"path": str(path)}}, ".")
    with pytest.raises(Exception, match="t.jsonl:2: field 'output': missing"):
        load_tasks(spec)
    path.write_text('{"instruction": "q", "output": "a"}\n')
    spec = load_task_spec({"name": "t", "data": {"path": str(path)}, "protocol": "options"}, ".")
    with pytest.raises(ConfigError, match="without options"):
        load_tasks(spec)
    with pytest.raises(ConfigError, match="not in the catalogue"):
        load_task_spec("no_such_task", ".")


def test_catalogue_lists_every_yaml():
    assert {"fpb", "pubmedqa", "superni_sentiment", "snli", "aqua"} <= set(catalogue())


def test_split_files(tmp_path: Path):
    (tmp_path / "s.yaml").write_text("train: [a]\nheldout: [b, c]\n")
    assert read_split_file(tmp_path / "s.yaml") == {"a": "train", "b": "heldout", "c": "heldout"}
    (tmp_path / "h.txt").write_text("b\n\nc\n")
    assert read_split_file(tmp_path / "h.txt") == {"b": "heldout", "c": "heldout"}
    (tmp_path / "bad.yaml").write_text("test: [a]\n")
    with pytest.raises(ConfigError, match="expected keys"):
        read_split_file(tmp_path / "bad.yaml")
