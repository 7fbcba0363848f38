"""SuperNI's official test tasks on real files: the classification rule, loading them for evaluation, and the
guarantee that no training mix contains one."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.data import closed_label_set, official_test_tasks, read_superni_task, superni_task_files


def test_classification_is_a_closed_label_set_rule(shared_data: Path):
    root = shared_data / "superni/test_tasks"
    anli = read_superni_task(root / "task1386_anli_r2_entailment.json.gz")
    assert closed_label_set(anli) == ["Contradiction", "Entailment", "Neutral"]
    generation = read_superni_task(root / "task036_qasc_topic_word_to_generate_related_fact.json.gz")
    assert closed_label_set(generation) is None
    classified = {n for n, f in superni_task_files(root).items() if closed_label_set(read_superni_task(f))}
    assert len(superni_task_files(root)) == 54 and len(classified) == 26  # of the 54 test tasks shipped here
    assert {"task1344_glue_entailment_classification", "task880_schema_guided_dstc8_classification"} <= classified
    assert closed_label_set(read_superni_task(root / "task880_schema_guided_dstc8_classification.json.gz"), 4) is None


def test_test_tasks_load_for_evaluation_with_their_label_sets_as_options(shared_data: Path):
    from specialize.eval.tasks import load_task_spec, load_tasks

    spec = load_task_spec({"name": "heldout_classification", "protocol": "options",
                           "superni": {"path": "{data_root}/superni/test_tasks", "classification": 10}},
                          str(shared_data))  # fmt: skip
    tasks = load_tasks(spec)
    assert len(tasks) == 26 and all(len(t.examples) == 100 for t in tasks)  # the official first 100
    for t in tasks:
        assert t.options == sorted({r for e in t.examples for r in e.references})
        assert all(set(e.references) <= set(t.options) for e in t.examples)


def test_no_training_mix_contains_an_official_test_task(shared_data: Path):
    from specialize.train.mixing import MixError, SourceSpec, build_mix, load_source

    test = official_test_tasks(shared_data / "superni/tasks")
    assert test is not None and len(test) == 119
    assert not set(superni_task_files(shared_data / "superni/tasks")) & test
    with pytest.raises(MixError, match="official SuperNI test tasks; never train on them"):
        load_source(SourceSpec(path=str(shared_data / "superni/test_tasks")))
    examples, _ = build_mix([SourceSpec(path=str(shared_data / "superni/tasks"),
                                               categories=["Sentiment Analysis"], amount=200)], seed=0)  # fmt: skip
    assert examples and not {e.task for e in examples} & test


def test_classification_training_tasks_follow_the_same_rule(shared_data: Path):
    """The specialist mix of the Classification level takes train tasks by the rule evaluation applies."""
    from specialize.train.mixing import SourceSpec, build_mix

    root = shared_data / "superni/tasks"
    examples, _ = build_mix([SourceSpec(path=str(root), classification=10, amount=300)], seed=0)
    tasks = {e.task for e in examples}
    files = superni_task_files(root)
    assert len(tasks) > 100  # an equal share of 300 over the rule's tasks: about one example each
    for name in tasks:
        labels = closed_label_set(read_superni_task(files[name]), 10)
        assert labels is not None
        assert all(set(e.references) <= set(labels) for e in examples if e.task == name)
    assert not tasks & (official_test_tasks(root) or set())
