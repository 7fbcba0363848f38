"""Mixes: equal task shares, determinism by seed, and clear errors for impossible requests."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from specialize.data import Example
from specialize.train.mixing import MixError, SourceSpec, build_mix, equal_shares, sample_source

SENTIMENT = ["task195_sentiment140_classification", "task363_sst2_polarity_classification",
             "task833_poem_sentiment_classification"]  # fmt: skip


def _records(sizes: dict[str, int]) -> list[Example]:
    return [Example(id=f"{t}-{i}", instruction=f"do {t}", output=str(i), task=t) for t, n in sizes.items()
            for i in range(n)]  # fmt: skip


def test_equal_shares_with_remainder_and_shortfall():
    assert equal_shares({"a": 100, "b": 100, "c": 100}, 10) == {"a": 4, "b": 3, "c": 3}
    # "a" has only 2: its shortfall goes to the others, still as evenly as possible
    assert equal_shares({"a": 2, "b": 100, "c": 100}, 30) == {"a": 2, "b": 14, "c": 14}
    assert sum(equal_shares({"a": 5, "b": 7}, 12).values()) == 12
    with pytest.raises(MixError, match="only 12 are available"):
        equal_shares({"a": 5, "b": 7}, 13)


def test_sample_is_deterministic_and_seed_dependent():
    recs = _records({"a": 50, "b": 50})
    one = [r.id for r in sample_source(recs, 20, seed=1)]
    assert one == [r.id for r in sample_source(recs, 20, seed=1)]
    assert one != [r.id for r in sample_source(recs, 20, seed=2)]
    assert Counter(i.split("-")[0] for i in one) == {"a": 10, "b": 10}
    assert len(set(one)) == 20


def test_adding_a_task_keeps_other_tasks_choices():
    base = sample_source(_records({"a": 50, "b": 50}), 20, seed=3)
    more = sample_source(_records({"a": 50, "b": 50, "c": 50}), 30, seed=3)
    assert {r.id for r in base if r.task == "a"} == {r.id for r in more if r.task == "a"}


def test_real_superni_mix_has_equal_task_shares(shared_data: Path):
    spec = SourceSpec(path=str(shared_data / "superni/tasks"), tasks=SENTIMENT, amount=300)
    examples, manifest = build_mix([spec], seed=0)
    assert len(examples) == 300
    assert Counter(e.task for e in examples) == dict.fromkeys(SENTIMENT, 100)
    [src] = manifest["sources"]
    raw = [json.loads(gzip.decompress((shared_data / f"superni/tasks/{t}.json.gz").read_bytes())) for t in SENTIMENT]
    assert src["ids"] == [e.id for e in examples]
    assert src["available"] == sum(len(r["Instances"]) for r in raw) == 884
    again, manifest2 = build_mix([spec], seed=0)
    assert [e.id for e in again] == [e.id for e in examples]
    assert manifest2["fingerprint"] == manifest["fingerprint"]


def test_category_filter_selects_sentiment_tasks(shared_data: Path):
    spec = SourceSpec(path=str(shared_data / "superni/tasks"), categories=["Sentiment Analysis"], amount=84)
    _, manifest = build_mix([spec], seed=0)
    per_task = manifest["sources"][0]["per_task"]
    assert len(per_task) == 42 and set(per_task.values()) == {2}


def test_held_out_tasks_are_excluded(shared_data: Path):
    held = ["task363_sst2_polarity_classification", "task195_sentiment140_classification"]
    spec = SourceSpec(path=str(shared_data / "superni/tasks"), categories=["Sentiment Analysis"], exclude_tasks=held)
    _, manifest = build_mix([spec], seed=0)
    per_task = manifest["sources"][0]["per_task"]
    assert len(per_task) == 40 and not set(held) & set(per_task)
    with pytest.raises(MixError, match="unknown tasks to exclude"):
        build_mix([spec.model_copy(update={"exclude_tasks": ["task0_nope"]})], seed=0)


def test_two_sources_mix(shared_data: Path):
    examples, manifest = build_mix(
        [SourceSpec(name="lima", path=str(shared_data / "generalist/lima/lima.json"), amount=10),
         SourceSpec(name="dolly", path=str(shared_data / "generalist/dolly_alpaca_fixtures/dolly.json"))],
        seed=0,
    )  # fmt: skip
    assert [s["selected"] for s in manifest["sources"]] == [10, 12]
    assert len(examples) == 22


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"path": "no/such/file.json"}, "does not exist"),
        ({"path": "superni/tasks", "tasks": ["task0_nope"]}, "unknown tasks"),
        ({"path": "superni/tasks", "tasks": SENTIMENT[:1], "amount": 301}, "only 300 are available"),
        ({"path": "generalist/lima/lima.json", "categories": ["X"]}, "need a directory"),
    ],
)
def test_bad_sources(shared_data: Path, spec: dict, message: str):
    spec = {**spec, "path": str(shared_data / spec["path"]) if "no/such" not in spec["path"] else spec["path"]}
    with pytest.raises(MixError, match=message):
        build_mix([SourceSpec(**spec)], seed=0)


def test_amount_must_be_positive():
    with pytest.raises(ValueError, match="amount must be >= 1"):
        SourceSpec(path="x", amount=0)
