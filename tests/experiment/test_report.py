"""Findings are computed from per-example predictions: the self-specialization finding on hand-made evaluations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from specialize.config import ConfigError
from specialize.experiment.findings import findings, read_predictions, robustness, table
from specialize.experiment.runner import BASE_RUN, SELF_SPEC


def _eval_dir(path: Path, model: str, scores: dict[tuple, list[float]]) -> str:
    """predictions.jsonl from {(task, k[, variant]): per-example accuracies}; the variant defaults to original."""
    path.mkdir()
    lines = [json.dumps({"model": model, "task": key[0], "k": key[1], "variant": (*key, "original")[2],
                         "id": f"{key[0]}-{i}", "scores": {"accuracy": v}})
             for key, values in scores.items() for i, v in enumerate(values)]  # fmt: skip
    (path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return str(path)


def _data(tmp_path: Path, base: dict, tuned: dict) -> dict:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    run = {"amount": 40, "seed": 0}
    runs = {
        BASE_RUN: {**run, "generalist": "none", "amount": 0, "weights": None,
                   "eval_dir": _eval_dir(tmp_path / "base", "base", base)},
        "self-spec-it1": {**run, "generalist": SELF_SPEC, "weights": str(adapter),
                          "eval_dir": _eval_dir(tmp_path / "tuned", "run", tuned)},
    }  # fmt: skip
    scores = [{"run_id": r, "task": t, "k": k, "variant": "original", "metric": "accuracy", "mean": 0.0}
              for r in runs for t, k in base]  # fmt: skip
    return {"runs": runs, "scores": scores, "meta": {}, **read_predictions(runs)}


def _assert_png(path: Path | None, min_width: int) -> None:
    """A figure was written, decodes, and holds the first two matplotlib colours (both series were drawn)."""
    from PIL import Image

    assert path is not None and path.is_file() and not list(path.parent.glob(f".{path.name}*"))  # no temp left
    img = Image.open(path).convert("RGB")
    assert img.width >= min_width
    colours = [c for _, c in img.getcolors(maxcolors=1 << 20)]
    near = lambda c, t: all(abs(a - b) < 30 for a, b in zip(c, t, strict=True))  # noqa: E731
    assert any(near(c, (31, 119, 180)) for c in colours) and any(near(c, (255, 127, 14)) for c in colours)


@pytest.mark.parametrize("better", [True, False])
def test_self_specialization_finding_is_a_paired_difference_per_shot_count(tmp_path: Path, better: bool):
    rng = random.Random(0)
    base = {(t, k): [float(rng.random() < 0.5) * 100 for _ in range(60)] for t in ("a", "b") for k in (0, 5)}
    # the tuned model fixes every wrong answer of task a at k=0 (or breaks every right one)
    tuned = {key: list(v) for key, v in base.items()}
    tuned[("a", 0)] = [100.0 if better else 0.0] * 60
    found = findings(_data(tmp_path, base, tuned))
    assert [f["k"] for f in found] == [0, 5] and all(f["finding"] == "self-specialization" for f in found)
    k0, k5 = found
    wrong = sum(v == 0 for v in base[("a", 0)])
    expected = (wrong if better else -(60 - wrong)) * 100 / 120  # pooled over both tasks' 120 examples
    assert k0["gain"]["mean"] == pytest.approx(expected)
    assert k0["holds"] is better and "k=0 (2 tasks, 120 examples)" in k0["text"]
    assert k5["gain"]["mean"] == 0 and k5["holds"] is False  # identical predictions: no gain


@pytest.mark.parametrize(("small", "large", "holds", "verdict"), [
    (30, 5, True, "helps most when task data is scarce"),
    (-5, -10, False, "does not help when task data is scarce"),  # less harm is not help
    (5, 20, False, "helps no more when task data is scarce"),
    (1, -1, False, "within noise; the paper's finding is not shown"),  # one flip in 100: the CI includes 0
])  # fmt: skip
def test_generalist_finding_needs_a_gain_that_shrinks_with_task_data(tmp_path, small, large, holds, verdict):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rng = random.Random(1)
    truth = [float(rng.random() < 0.5) * 100 for _ in range(100)]

    def shifted(points: int) -> list[float]:  # flip |points| percent of the examples toward (or away from) right
        flips = [i for i, v in enumerate(truth) if (v == 0) == (points > 0)][: abs(points)]
        return [(100.0 - v) if i in flips else v for i, v in enumerate(truth)]

    runs = {}
    for n, gain in ((8, small), (16, large)):
        for g, values in (("none", truth), ("gen", shifted(gain))):
            runs[f"{g}-n{n}"] = {"generalist": g, "amount": n, "seed": 0, "weights": str(adapter),
                                 "eval_dir": _eval_dir(tmp_path / f"{g}{n}", "run", {("t", 0): values})}  # fmt: skip
    scores = [{"run_id": r, "task": "t", "k": 0, "variant": "original", "metric": "accuracy"} for r in runs]
    (found,) = findings({"runs": runs, "scores": scores, "meta": {}, **read_predictions(runs)})
    assert found["gain_small"]["mean"] == pytest.approx(small) and found["gain_large"]["mean"] == pytest.approx(large)
    assert found["holds"] is holds and verdict in found["text"]


def test_two_generalist_sources_are_compared_head_to_head_on_shared_examples(tmp_path: Path):
    """Shi et al.'s Figure 6: LIMA vs GPT-4-written data, a paired difference between the two sources per amount."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    truth = [0.0] * 50 + [100.0] * 50
    better = [100.0] * 10 + truth[10:]  # 10 more right answers of 100: +10 points, every resample positive
    runs = {}
    for n in (8, 16):
        for g, values in (("none", truth), ("human", better if n == 8 else truth), ("machine", truth)):
            runs[f"{g}-n{n}"] = {"generalist": g, "amount": n, "seed": 0, "weights": str(adapter),
                                 "eval_dir": _eval_dir(tmp_path / f"{g}{n}", "run", {("t", 0): values})}  # fmt: skip
    scores = [{"run_id": r, "task": "t", "k": 0, "variant": "original", "metric": "accuracy"} for r in runs]
    found = findings({"runs": runs, "scores": scores, "meta": {}, **read_predictions(runs)})
    (contrast,) = [f for f in found if f["finding"] == "generalist-source"]
    assert contrast["generalists"] == ["human", "machine"] and contrast["holds"] is None
    small, large = contrast["difference"][8], contrast["difference"][16]
    assert small["mean"] == pytest.approx(10) and small["low"] > 0
    assert large["mean"] == 0 and "+10.0" in contrast["text"] and "at n=16 (CI includes 0)" in contrast["text"]
    assert "at n=8 (CI" not in contrast["text"]
    assert [f["generalist"] for f in found if f["finding"] == "generalist-gain"] == ["human", "machine"]


def test_many_tasks_are_summarized_by_a_pooled_row_and_one_curve(tmp_path):
    from specialize.experiment.findings import curves, table

    rng = random.Random(2)
    tasks = [f"task{i}" for i in range(6)]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    runs, scores, pooled = {}, [], {}
    for run_id, amount, weights in (
        ("base", 0, None),
        ("none-n8-s0", 8, str(adapter)),
        ("none-n16-s0", 16, str(adapter)),
    ):
        values = {(t, 0): [float(rng.random() < 0.3 + 0.02 * amount) * 100 for _ in range(20)] for t in tasks}
        model = "base" if weights is None else "run"
        runs[run_id] = {"generalist": "none", "amount": amount, "seed": 0, "weights": weights,
                        "eval_dir": _eval_dir(tmp_path / run_id, model, values)}  # fmt: skip
        scores += [{"run_id": run_id, "task": t, "k": 0, "variant": "original", "metric": "accuracy",
                    "mean": sum(values[(t, 0)]) / 20, "ci_low": 0.0, "ci_high": 100.0} for t in tasks]  # fmt: skip
        pooled[run_id] = sum(sum(v) for v in values.values()) / 120
    data = {"runs": runs, "scores": scores, "meta": {}, **read_predictions(runs)}
    tab = table(data)
    last = tab["rows"][-1]
    assert len(tab["rows"]) == 7 and last["task"] == "all 6 tasks"
    assert [c["mean"] for c in last["cells"]] == pytest.approx([pooled["base"], pooled["none-n16-s0"]])
    assert all(c["low"] <= c["mean"] <= c["high"] for c in last["cells"])
    cv = curves(data)
    assert list(cv) == ["all 6 tasks"]  # not six side-by-side panels
    points = cv["all 6 tasks"]["none"]
    assert [p[0] for p in points] == [8, 16]
    assert [p[1] for p in points] == pytest.approx([pooled["none-n8-s0"], pooled["none-n16-s0"]])


@pytest.mark.parametrize("robust", [True, False, None])
def test_paraphrase_robustness_table_and_finding(tmp_path: Path, robust: bool | None):
    """robust: the generalist model loses far fewer answers to rewording; False: as many; None: one fewer (a
    positive mean whose CI includes 0 is not the paper's finding)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    truth = [100.0] * 60 + [0.0] * 40

    def reworded(drops: tuple[int, int]) -> dict[tuple, list[float]]:  # the first d right answers turn wrong
        out = {("t", 0): truth}
        for j, d in enumerate(drops):
            out[("t", 0, f"paraphrase-{j + 1}")] = [0.0] * d + truth[d:]
        return out

    fragile = reworded((20, 10))
    generalist = {True: reworded((2, 0)), False: fragile, None: reworded((20, 9))}[robust]
    runs = {
        "none-n16-s0": {"generalist": "none", "amount": 16, "seed": 0, "weights": str(adapter),
                        "eval_dir": _eval_dir(tmp_path / "none", "run", fragile)},
        "gen-n16-s0": {"generalist": "gen", "amount": 16, "seed": 0, "weights": str(adapter),
                       "eval_dir": _eval_dir(tmp_path / "gen", "run", generalist)},
    }  # fmt: skip
    scores = [{"run_id": r, "task": "t", "k": 0, "variant": "original", "metric": "accuracy", "mean": 0.0,
               "ci_low": 0.0, "ci_high": 100.0} for r in runs]  # fmt: skip
    data = {"runs": runs, "scores": scores, "meta": {}, **read_predictions(runs)}
    rows = {r["run"]: r for r in robustness(data)}
    none = rows["none-n16-s0"]
    assert (none["original"], none["paraphrased"], none["worst"], none["best"]) == pytest.approx((60, 45, 40, 50))
    assert none["change"]["mean"] == pytest.approx(-15) and none["change"]["high"] < 0
    assert none["paraphrases"] == 2 and none["examples"] == 100
    [found] = [f for f in findings(data) if f["finding"] == "paraphrase-robustness"]
    assert found["gain"]["mean"] == pytest.approx({True: 14, False: 0, None: 0.5}[robust])
    assert found["holds"] is bool(robust)
    if robust is None:
        assert found["gain"]["low"] <= 0 < found["gain"]["mean"] and "no significant difference" in found["text"]
    from specialize.experiment.report import plot_robustness

    assert plot_robustness([], tmp_path / "none.png") is None
    _assert_png(plot_robustness(robustness(data), tmp_path / "robustness.png"), min_width=400)

    # a model that ranks one option first for everything is trivially unmoved by rewording: no verdict
    for name in ("none", "gen"):
        path = tmp_path / name / "predictions.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        for i, r in enumerate(rows):
            r |= {"option_logprobs": {"yes": -1.0, "no": -2.0},
                  "prediction": "yes" if name == "gen" or i % 2 else "no"}  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["answers"] = read_predictions(runs)["answers"]
    assert data["answers"]["gen-n16-s0"] == {"t": {"yes"}} and data["answers"]["none-n16-s0"] == {"t": {"yes", "no"}}
    [found] = [f for f in findings(data) if f["finding"] == "paraphrase-robustness"]
    assert found["holds"] is None and "one answer to every example" in found["text"]
    [row] = table(data)["rows"]  # and the table marks the constant model's score
    assert [c["one_answer"] for c in row["cells"]] == [False, True]


def test_report_groups_pool_their_tasks_into_rows_and_findings(tmp_path: Path):
    """Skills as in Shi et al. Table 2: generalist data helps reasoning with scarce task data, harms factual."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    truth = [100.0] * 50 + [0.0] * 50

    def moved(points: int) -> list[float]:  # +p: p wrong answers turn right; -p: p right answers turn wrong
        return [0.0] * -points + truth[-points:] if points < 0 else truth[:50] + [100.0] * points + truth[50 + points :]

    gain = {("fact", 8): -10, ("fact", 16): -10, ("reason", 8): 30, ("reason", 16): 5}
    runs = {}
    for n in (8, 16):
        for g in ("none", "gen"):
            values = {(t, 0): moved(gain[(t, n)]) if g == "gen" else truth for t in ("fact", "reason")}
            runs[f"{g}-n{n}"] = {"generalist": g, "amount": n, "seed": 0, "weights": str(adapter),
                                 "eval_dir": _eval_dir(tmp_path / f"{g}{n}", "run", values)}  # fmt: skip
    scores = [{"run_id": r, "task": t, "k": 0, "variant": "original", "metric": "accuracy", "mean": 0.0,
               "ci_low": 0.0, "ci_high": 100.0} for r in runs for t in ("fact", "reason")]  # fmt: skip
    groups = {"factual": ["fact"], "reasoning": ["reason"]}
    data = {"runs": runs, "scores": scores, "meta": {"config": {"report_groups": groups}},
            **read_predictions(runs)}  # fmt: skip
    rows = {r["task"]: r for r in table(data)["rows"]}
    assert list(rows) == ["fact", "reason", "all 2 tasks", "factual (1 task)", "reasoning (1 task)"]
    # columns: specialist (n=16), specialist + gen (n=16)
    assert [c["mean"] for c in rows["reasoning (1 task)"]["cells"]] == pytest.approx([50, 55])
    assert [c["mean"] for c in rows["factual (1 task)"]["cells"]] == pytest.approx([50, 40])
    found = {f["scope"]: f for f in findings(data) if f["finding"] == "generalist-gain"}
    assert found["reasoning"]["holds"] is True and found["reasoning"]["text"].startswith("[reasoning] ")
    assert found["reasoning"]["gain_small"]["mean"] == pytest.approx(30)
    assert found["factual"]["holds"] is False and found["factual"]["gain_small"]["mean"] == pytest.approx(-10)
    assert found[None]["gain_small"]["mean"] == pytest.approx(10)  # pooled: (-10 + 30) / 2
    data["meta"]["config"]["report_groups"] = {"factual": ["fact", "nq_open"]}
    with pytest.raises(ConfigError, match=r"report_groups.factual: \['nq_open'\] were not evaluated"):
        table(data)


def test_seeds_are_pooled_by_a_bootstrap_over_seed_averaged_examples(tmp_path):
    """A cell over several seeds is labelled a 95% bootstrap CI, so it must be one: each example's score averaged
    over the seeds, then bootstrapped (before: the lowest low and the highest high of the seeds' own CIs)."""
    from specialize.eval.stats import bootstrap_ci
    from specialize.experiment.findings import curves, table

    rng = random.Random(3)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    runs, scores, values = {}, [], {}
    for seed in (0, 1):
        run_id = f"none-n8-s{seed}"
        values[seed] = [float(rng.random() < 0.5) * 100 for _ in range(30)]
        runs[run_id] = {"generalist": "none", "amount": 8, "seed": seed, "weights": str(adapter),
                        "eval_dir": _eval_dir(tmp_path / run_id, "run", {("t", 0): values[seed]})}  # fmt: skip
        scores.append({"run_id": run_id, "task": "t", "k": 0, "variant": "original", "metric": "accuracy",
                       "mean": sum(values[seed]) / 30, "ci_low": 0.0, "ci_high": 100.0})  # fmt: skip
    data = {"runs": runs, "scores": scores, "meta": {}, **read_predictions(runs)}
    [cell] = table(data)["rows"][0]["cells"]
    est = bootstrap_ci([(a + b) / 2 for a, b in zip(values[0], values[1], strict=True)], resamples=1000)
    assert (cell["mean"], cell["low"], cell["high"]) == pytest.approx((est.mean, est.low, est.high))
    assert cell["seeds"] == 2 and (cell["low"], cell["high"]) != (0.0, 100.0)
    [(amount, mean, low, high)] = curves(data)["t"]["none"]
    assert (amount, mean, low, high) == pytest.approx((8, est.mean, est.low, est.high))


def test_over_shots_is_worst_average_best_of_each_row_over_k(tmp_path: Path):
    # Kang et al. Table 4 from the per-k rows of the table, the pooled row included
    base = {("a", 0): [0.0] * 10, ("a", 1): [50.0] * 10, ("a", 5): [100.0] * 10,
            ("b", 0): [20.0] * 10, ("b", 1): [20.0] * 10, ("b", 5): [80.0] * 10}  # fmt: skip
    tuned = {key: [v[0] / 2] * 10 for key, v in base.items()}
    data = _data(tmp_path, base, tuned)
    for s in data["scores"]:  # the headline cells a single run reads come from the score rows
        s.update({"mean": (base if s["run_id"] == BASE_RUN else tuned)[(s["task"], s["k"])][0], "ci_low": 0.0,
                  "ci_high": 100.0})  # fmt: skip
    from specialize.experiment.findings import over_shots

    tab = table(data)
    rows = {r["task"]: r for r in over_shots(tab)}
    assert set(rows) == {"a", "b", "all 2 tasks"} and rows["a"]["ks"] == [0, 1, 5]
    base_col, tuned_col = tab["columns"].index("base"), tab["columns"].index("self-specialized")
    assert rows["a"]["cells"][base_col] == {"worst": 0.0, "average": 50.0, "best": 100.0}
    assert rows["b"]["cells"][tuned_col] == {"worst": 10.0, "average": 20.0, "best": 40.0}
    assert rows["all 2 tasks"]["cells"][base_col]["best"] == pytest.approx(90.0)  # k=5 pooled: (100 + 80) / 2
    one_k = {"columns": tab["columns"], "rows": [r for r in tab["rows"] if r["k"] == 0]}
    assert over_shots(one_k) == []
    # a column evaluated at fewer k (a Table 2 variant at k = 0 only) has no worst/average/best cell
    k0_only = {"columns": tab["columns"], "rows": [{**r, "cells": [c if i != tuned_col or r["k"] == 0 else None
                                                                   for i, c in enumerate(r["cells"])]}
                                                   for r in tab["rows"]]}  # fmt: skip
    partial = {r["task"]: r for r in over_shots(k0_only)}
    assert partial["a"]["cells"][tuned_col] is None and partial["a"]["cells"][base_col] == rows["a"]["cells"][base_col]

    # drawn (Kang et al. Table 1 as curves): each column's points at the k it was evaluated, ascending
    from specialize.experiment.findings import shot_curves
    from specialize.experiment.report import plot_shots

    curves = shot_curves(k0_only)
    assert set(curves) == {"a", "b", "all 2 tasks"}
    assert [p[:2] for p in curves["a"]["base"]] == [(0, 0.0), (1, 50.0), (5, 100.0)]
    assert [p[:2] for p in curves["b"]["self-specialized"]] == [(0, 10.0)]  # k = 0 only: one point
    assert shot_curves(one_k) == {} and plot_shots(one_k, tmp_path / "none.png") is None
    _assert_png(plot_shots(k0_only, tmp_path / "shots.png"), min_width=3 * 400)  # three panels side by side


def test_a_declared_primary_metric_reaches_the_report(tmp_path: Path):
    from specialize.eval.results import Estimate, ScoreEntry
    from specialize.experiment.findings import primary_metrics
    from specialize.experiment.runner import PRIMARY_META, Store

    est = Estimate(mean=50.0, ci95=(40.0, 60.0))
    entry = ScoreEntry(model="base", task="fpb", k=0, variant="original", n=10, split="all",
                       metrics={"token_f1": est, "rouge_l": est}, primary="token_f1")  # fmt: skip
    store = Store(tmp_path / "results.sqlite")
    store.record(BASE_RUN, {"model": "m", "generalist": "none", "amount": 0, "seed": 0, "weights": None,
                            "eval_dir": "x", "config": None, "train_s": 0.0, "eval_s": 1.0}, [entry])  # fmt: skip
    _, scores, meta = store.read()
    assert meta[PRIMARY_META] == {"fpb": "token_f1"}
    assert primary_metrics(scores) == {"fpb": "rouge_l"}  # the shared rule alone prefers ROUGE-L
    assert primary_metrics(scores, meta[PRIMARY_META]) == {"fpb": "token_f1"}
    assert ScoreEntry.model_validate(json.loads(json.dumps(entry.model_dump()))).primary == "token_f1"


def test_table_2_rows_are_the_variants_in_the_papers_order_with_paired_differences(tmp_path: Path):
    from specialize.experiment.findings import iterations_table

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rng = random.Random(0)
    base = [float(rng.random() < 0.3) * 100 for _ in range(80)]
    gains = {"it2-new": 1.0, "it1-top1": 0.0, "it1-marginalize": 0.5, "it1-none": 0.25, "it2-same": 0.75}
    runs = {BASE_RUN: {"generalist": "none", "amount": 0, "seed": 0, "weights": None, "eval_dir": ""}}
    per_run = {BASE_RUN: base}
    for variant, share in gains.items():  # each variant fixes this share of the base model's wrong answers
        wrong = [i for i, v in enumerate(base) if v == 0]
        fixed = set(wrong[: round(share * len(wrong))])
        per_run[f"{SELF_SPEC}-{variant}"] = [100.0 if i in fixed else v for i, v in enumerate(base)]
        runs[f"{SELF_SPEC}-{variant}"] = {"generalist": SELF_SPEC, "amount": 10, "seed": 0, "weights": str(adapter)}
    for run_id, values in per_run.items():
        d = tmp_path / run_id
        d.mkdir()
        model = "base" if run_id == BASE_RUN else "run"
        (d / "predictions.jsonl").write_text("".join(json.dumps({
            "model": model, "task": "t", "k": 0, "variant": "original", "id": str(i),
            "scores": {"token_f1": v, "rouge_l": v / 2}}) + "\n" for i, v in enumerate(values)))  # fmt: skip
        runs[run_id]["eval_dir"] = str(d)
    scores = [{"run_id": r, "task": "t", "k": 0, "variant": "original", "metric": m, "mean": 0.0, "ci_low": 0.0,
               "ci_high": 0.0} for r in runs for m in ("token_f1", "rouge_l")]  # fmt: skip
    data = {"runs": runs, "scores": scores, "meta": {"primary_metrics": {"t": "token_f1"}}, **read_predictions(runs)}
    rows = iterations_table(data)
    assert [r["run"].removeprefix(f"{SELF_SPEC}-") for r in rows] == [
        BASE_RUN, "it1-marginalize", "it1-top1", "it1-none", "it2-same", "it2-new"]  # fmt: skip
    assert rows[0]["label"] == "base" and rows[0]["vs_base"] is None
    assert rows[0]["primary"] == pytest.approx(sum(base) / 80) and rows[0]["rouge_l"] == pytest.approx(sum(base) / 160)
    wrong = sum(v == 0 for v in base)
    for r in rows[1:]:
        share = gains[r["run"].removeprefix(f"{SELF_SPEC}-")]
        assert r["vs_base"]["mean"] == pytest.approx(round(share * wrong) * 100 / 80)
    assert rows[2]["label"] == "self-specialized it1, top-1 doc" and rows[2]["vs_base"]["mean"] == 0
    tab = table(data)  # one column per variant, not one pooled "self-specialized" column
    assert tab["columns"] == ["base", *(r["label"] for r in rows[1:])]
    found = [f for f in findings(data) if f["finding"] == "self-specialization"]
    assert {f["run"] for f in found} == set(runs) - {BASE_RUN}
    assert next(f for f in found if f["run"].endswith("it2-new"))["holds"] is True


def test_self_specialization_is_also_tested_within_each_report_group(tmp_path: Path):
    rng = random.Random(1)
    base = {(t, 0): [float(rng.random() < 0.5) * 100 for _ in range(60)] for t in ("a", "b")}
    tuned = {("a", 0): [0.0] * 60, ("b", 0): list(base[("b", 0)])}  # breaks every right answer of task a
    data = _data(tmp_path, base, tuned)
    data["meta"] = {"config": {"report_groups": {"only a": ["a"], "only b": ["b"]}}}
    found = {f["scope"]: f for f in findings(data) if f["finding"] == "self-specialization"}
    right = sum(v > 0 for v in base[("a", 0)])
    assert found["only a"]["gain"]["mean"] == pytest.approx(-right * 100 / 60)
    assert "worse than the base model" in found["only a"]["text"] and found["only a"]["text"].startswith("[only a]")
    assert found["only b"]["gain"]["mean"] == 0 and found[None]["gain"]["mean"] == pytest.approx(-right * 100 / 120)


def test_rouge_l_is_reported_beside_a_primary_f1_for_the_tasks_that_record_it(tmp_path: Path):
    """Kang et al. score by F1 and report ROUGE-L too: a second table on ROUGE-L for the generation tasks only
    (an option-ranking task without it gets no row), its numbers the examples' ROUGE-L, not their F1."""
    from specialize.experiment.findings import secondary_table
    from specialize.experiment.report import markdown

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rng = random.Random(1)
    cost = {"seed": 0, "train_s": 1.0, "eval_s": 1.0}
    runs = {BASE_RUN: {"generalist": "none", "amount": 0, "weights": None, **cost},
            f"{SELF_SPEC}-it1": {"generalist": SELF_SPEC, "amount": 10, "weights": str(adapter), **cost}}  # fmt: skip
    metrics = {"gen_a": ("token_f1", "rouge_l"), "gen_b": ("token_f1", "rouge_l"), "opts": ("accuracy",)}
    scores, rouge = [], {}
    for run_id, r in runs.items():
        d = tmp_path / run_id
        d.mkdir()
        lines = []
        for task, ms in metrics.items():
            for k in (0, 5):
                per = [{m: rng.random() * 100 for m in ms} for _ in range(30)]
                model = "base" if r["weights"] is None else "run"
                lines += [json.dumps({"model": model, "task": task, "k": k, "variant": "original", "id": str(i),
                                      "scores": s}) for i, s in enumerate(per)]  # fmt: skip
                for m in ms:
                    mean = sum(s[m] for s in per) / 30
                    scores.append({"run_id": run_id, "task": task, "k": k, "variant": "original", "metric": m,
                                   "mean": mean, "ci_low": mean - 5, "ci_high": mean + 5})  # fmt: skip
                    if m == "rouge_l":
                        rouge[(run_id, task, k)] = mean
        (d / "predictions.jsonl").write_text("\n".join(lines) + "\n")
        r["eval_dir"] = str(d)
    declared = {"gen_a": "token_f1", "gen_b": "token_f1", "opts": "accuracy"}
    groups = {"generation": ["gen_a", "gen_b"], "options": ["opts"]}
    data = {"runs": runs, "scores": scores, **read_predictions(runs),
            "meta": {"primary_metrics": declared, "config": {"report_groups": groups}}}  # fmt: skip

    second = secondary_table(data, "rouge_l")
    assert second is not None and second["columns"] == table(data)["columns"]
    assert [r["task"] for r in second["rows"]] == [
        f"{t} (k={k})" for k in (0, 5) for t in ("gen_a", "gen_b", "all 2 tasks")
    ]  # the generation group is every task with ROUGE-L: no second row of the same pool
    by = {(r["name"], r["k"]): r for r in second["rows"]}
    for (run_id, task, k), mean in rouge.items():
        col = 0 if run_id == BASE_RUN else 1
        assert by[(task, k)]["metric"] == "rouge_l" and by[(task, k)]["cells"][col]["mean"] == pytest.approx(mean)
    pooled = by[("all 2 tasks", 5)]["cells"][1]
    assert pooled["mean"] == pytest.approx((rouge[(f"{SELF_SPEC}-it1", "gen_a", 5)]
                                            + rouge[(f"{SELF_SPEC}-it1", "gen_b", 5)]) / 2)  # fmt: skip
    assert pooled["low"] < pooled["mean"] < pooled["high"]
    primary = {(r["name"], r["k"]): r["metric"] for r in table(data)["rows"]}
    assert primary[("gen_a", 0)] == "token_f1" and primary[("opts", 0)] == "accuracy"  # the main table is unchanged

    md = markdown(data, table(data), {}, [], [], {}, second)
    assert "## ROUGE-L beside the primary metric" in md and "| gen_b (k=5) (rouge_l) |" in md
    # ROUGE-L as the primary metric (nothing declared: the shared rule prefers it) needs no second table
    assert secondary_table({**data, "meta": {}}, "rouge_l") is None
