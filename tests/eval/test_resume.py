"""`specialize eval` resumes after a kill; k-shot on SuperNI tasks with few positive examples; the summary reads
in a log file or a narrow terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from specialize.eval import harness
from specialize.eval.harness import EvalConfig, evaluate
from specialize.eval.results import Summary

QA = [("Is fire hot?", "yes"), ("Is ice hot?", "no"), ("Is snow cold?", "yes"), ("Is lava cold?", "no")]


def _cfg(tmp_path: Path, model_dir: Path, out: str) -> EvalConfig:
    path = tmp_path / "yn.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Answer yes or no.", "input": q, "output": a,
                                        "options": ["yes", "no"]}) + "\n" for q, a in QA))  # fmt: skip
    tasks = [
        {"name": "yn_options", "data": {"path": str(path)}, "protocol": "options", "shots": [0, 1],
         "paraphrases": ["Reply with yes or no."]},
        {"name": "yn_generate", "data": {"path": str(path)}, "max_new_tokens": 3},
    ]  # fmt: skip
    return EvalConfig(model={"spec": str(model_dir), "dtype": "float32"}, tasks=tasks, output_dir=str(tmp_path / out))


def test_a_killed_evaluation_resumes_to_the_same_results(tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    whole = evaluate(_cfg(tmp_path, tiny_model_dir, "whole"), progress=False)

    real, calls = harness._predict, []

    def dies_on_the_third_unit(*args, **kwargs):
        calls.append(args[3].name)  # (rt, engine, model name, task, ...)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill
        return real(*args, **kwargs)

    cfg = _cfg(tmp_path, tiny_model_dir, "killed")
    monkeypatch.setattr(harness, "_predict", dies_on_the_third_unit)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, progress=False)
    out = Path(cfg.output_dir)
    assert not (out / "predictions.jsonl").exists() and not (out / "summary.json").exists()
    assert (out / harness.PARTIAL).is_file()

    calls.clear()
    monkeypatch.setattr(harness, "_predict", lambda *a, **k: (calls.append(a[3].name), real(*a, **k))[1])
    resumed = evaluate(cfg, progress=False)
    assert len(calls) == 5 - 2  # 5 units (options: k 0/1 x 2 instructions, generation: 1); 2 were done
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "whole/predictions.jsonl").read_text()
    assert resumed.model_dump(exclude={"seconds"}) == whole.model_dump(exclude={"seconds"})
    assert not (out / harness.PARTIAL).exists()


def test_a_partial_log_of_another_evaluation_is_not_reused(tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir, "o")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    stale = {"model": "base", "task": "yn_generate", "k": 0, "variant": "original", "id": "x", "prediction": "?"}
    lines = [{"fingerprint": "other"}, stale, {"unit_done": ["base", "yn_generate", 0, "original"]}]
    (out / harness.PARTIAL).write_text("".join(json.dumps(x) + "\n" for x in lines))
    evaluate(cfg, progress=False)
    ids = {json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert "x" not in ids


@pytest.mark.slow
def test_five_shots_on_a_superni_task_with_two_positive_examples(shared_data: Path):
    """task065 has 2 positive examples: k=5 takes both and 3 of the task's instances that are not evaluated."""
    from specialize.eval.tasks import load_task_spec, load_tasks, with_demos

    name = "task065_timetravel_consistent_sentence_classification"
    select = {"path": "{data_root}/superni/tasks", "tasks": [name]}
    spec = load_task_spec({"name": "g", "superni": select, "limit": 10}, str(shared_data))
    [task] = load_tasks(spec)
    assert len(task.demos) == 2
    cfg = EvalConfig(tasks=[spec.model_dump()], shots=[5], data_root=str(shared_data))
    harness.prepare(cfg)  # refused before: "2 demonstrations cannot give k=5"
    evaluated = {e.id for e in task.examples}
    for e in task.examples:
        shot = with_demos(e, task.demos, 5, 0, task.fallback_demos)
        ids, borrowed = shot.metadata["demo_ids"], shot.metadata["fallback_demo_ids"]
        assert len(ids) == 5 and set(ids[:2]) == {d.id for d in task.demos} and ids[2:] == borrowed
        assert not set(borrowed) & evaluated
    assert "fallback_demo_ids" not in with_demos(task.examples[0], task.demos, 2, 0, task.fallback_demos).metadata


def test_summary_is_one_whole_line_per_score_on_a_narrow_console():
    from rich.console import Console

    long = "task1312_amazonreview_polarity_classification"
    entry = {
        "model": "base",
        "task": long,
        "k": 0,
        "variant": "original",
        "split": "all",
        "n": 40,
        "accuracy": {"mean": 51.25, "ci95": [40.0, 62.5]},
        "majority_baseline": 50.0,
        "above_majority": True,
    }
    summary = Summary.model_validate({"scores": [entry]})  # summary.json's shape: metrics at the top level
    buf = io.StringIO()
    harness.print_summary(summary, Console(file=buf, width=80, force_terminal=False))
    lines = buf.getvalue().splitlines()
    assert f"base {long} k=0 original all n=40 accuracy 51.25 [40.00, 62.50] majority 50.00 (above)" in lines
    assert "…" not in buf.getvalue()
    wide = io.StringIO()
    harness.print_summary(summary, Console(file=wide, width=200, force_terminal=True))
    assert "┃" in wide.getvalue() or "│" in wide.getvalue()  # a wide terminal keeps the rich table
