"""Kang et al.'s finance benchmarks on the real files: FiQA-SA and SemEval-2017 headlines with the stated
score-to-label rule, and seeded splits that are deterministic and disjoint."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from specialize.data import read_records
from specialize.data.benchmarks import NEUTRAL_BAND, score_label
from specialize.data.splits import seeded_split

FIQA = "finance/fiqa_semeval17/FiQA_post.json"
HEADLINES = "finance/fiqa_semeval17/SemEval2017Task5Headlines.json"


def test_score_to_label_rule():
    assert [score_label(x) for x in (-0.5, -NEUTRAL_BAND, 0.0, NEUTRAL_BAND, 0.11)] == [
        "negative", "neutral", "neutral", "neutral", "positive"]  # fmt: skip


@pytest.mark.parametrize(("path", "fmt", "n"), [(FIQA, "fiqa-sa", 675), (HEADLINES, "semeval17-headlines", 1142)])
def test_finance_sentiment_files_read_with_labels_from_scores(shared_data: Path, path: str, fmt: str, n: int):
    result = read_records(shared_data / path, fmt)
    assert len(result.records) == n and not result.skipped
    labels = Counter(e.output for e in result.records)
    assert set(labels) == {"negative", "neutral", "positive"} and min(labels.values()) > 20
    for e in result.records:
        assert e.output == score_label(float(e.metadata["score"])) and e.options == ("negative", "neutral", "positive")
        assert e.input and "Reply with negative, neutral, or positive" in e.instruction


@pytest.mark.parametrize("path", [FIQA, HEADLINES, "finance/financial_phrasebank/all-data.csv"])
def test_seeded_splits_are_deterministic_disjoint_and_order_free(shared_data: Path, path: str):
    fmt = {FIQA: "fiqa-sa", HEADLINES: "semeval17-headlines"}.get(path, "fpb")
    records = read_records(shared_data / path, fmt).records
    parts = seeded_split(records, {"seeds": 0.2, "test": 0.8}, seed=0)
    ids = {k: [e.id for e in v] for k, v in parts.items()}
    assert not set(ids["seeds"]) & set(ids["test"]) and len(ids["seeds"]) + len(ids["test"]) == len(records)
    assert 0.15 < len(ids["seeds"]) / len(records) < 0.25
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    again = seeded_split(shuffled, {"seeds": 0.2, "test": 0.8}, seed=0)
    assert {k: sorted(e.id for e in v) for k, v in again.items()} == {k: sorted(v) for k, v in ids.items()}
    other = seeded_split(records, {"seeds": 0.2, "test": 0.8}, seed=1)
    assert [e.id for e in other["seeds"]] != ids["seeds"]
    with pytest.raises(ValueError, match="sum to 1"):
        seeded_split(records, {"seeds": 0.2, "test": 0.7}, seed=0)
    # a sentence that occurs more than once (SemEval scores a headline once per company) is in one part only
    texts = {k: {e.input for e in v} for k, v in parts.items()}
    assert not texts["seeds"] & texts["test"]


def test_repeated_headlines_exist_and_stay_together(shared_data: Path):
    records = read_records(shared_data / HEADLINES, "semeval17-headlines").records
    repeated = [t for t, n in Counter(e.input for e in records).items() if n > 1]
    assert len(repeated) > 100  # the reason the split keys on the text, not the id
    parts = seeded_split(records, {"train": 0.5, "test": 0.5}, seed=0)
    where = {e.input: k for k, v in parts.items() for e in v}
    assert all(sum(e.input == t for e in parts[where[t]]) == sum(e.input == t for e in records) for t in repeated)


def test_a_source_selects_one_part_then_the_first_n(shared_data: Path):
    from pydantic import ValidationError

    from specialize.data.sources import DataSource

    half = {"seed": 3, "fractions": {"train": 0.5, "test": 0.5}}
    src = {"path": str(shared_data / FIQA), "format": "fiqa-sa"}
    train = DataSource(**src, seeded_split={**half, "part": "train"}).read()
    test = DataSource(**src, seeded_split={**half, "part": "test"}).read()
    assert len(train) + len(test) == 675 and not {e.id for e in train} & {e.id for e in test}
    assert DataSource(**src, seeded_split={**half, "part": "train"}, first=30).read() == train[:30]
    with pytest.raises(ValidationError, match="part 'dev' is not one of"):
        DataSource(**src, seeded_split={**half, "part": "dev"})


@pytest.mark.parametrize("name", ["fiqa_sa", "semeval17_headlines"])
def test_catalogue_entries_load_as_three_way_option_tasks(shared_data: Path, name: str):
    from specialize.eval.tasks import load_task_spec, load_tasks

    [task] = load_tasks(load_task_spec(name, str(shared_data)))
    assert len(task.examples) == 200 and all(e.options == ("negative", "neutral", "positive") for e in task.examples)
