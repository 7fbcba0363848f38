"""The numbers of a report, computed from an experiment's results store and per-example predictions: the
paper-style table, score-vs-amount curves, robustness to paraphrases and the findings (paired bootstrap).
`report.py` renders them; nothing here draws or writes."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from specialize.config import ConfigError
from specialize.eval.metrics import primary_metric
from specialize.eval.results import read_predictions as read_prediction_file
from specialize.eval.stats import bootstrap_ci, paired_bootstrap
from specialize.experiment.runner import BASE, PRIMARY_META, RUN, SELF_SPEC, Store, is_adapter


def load(db_path: Path) -> dict[str, Any]:
    runs, scores, meta = Store(db_path).read()
    return {"runs": runs, "scores": scores, "meta": meta, **read_predictions(runs)}


Examples = dict[tuple[str, int, str, str], dict[str, float]]  # (task, k, variant, example id) -> metric scores


def read_predictions(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each run's predictions file, read once, as
    - examples: run_id -> (task, k, variant, example id) -> metric scores of the model the run evaluated;
    - answers: run_id -> task -> the distinct options that model ranked first (option-ranking tasks, every k
      and instruction): one answer to everything is a degenerate model, whatever its score."""
    examples: dict[str, Examples] = {}
    answers: dict[str, dict[str, set[str]]] = {}
    for run_id, r in runs.items():
        model, rows, tasks = _evaluated(r), examples.setdefault(run_id, {}), answers.setdefault(run_id, {})
        for p in read_prediction_file(Path(r["eval_dir"]) / "predictions.jsonl"):
            if p.model != model:
                continue
            rows[(p.task, p.k, p.variant, p.id)] = p.scores
            if p.option_logprobs is not None:
                tasks.setdefault(p.task, set()).add(p.prediction)
    return {"examples": examples, "answers": answers}


def primary_metrics(scores: list[dict[str, Any]], declared: dict[str, str] | None = None) -> dict[str, str]:
    """Task -> the metric it is compared on: the one its evaluation declared (a task's `primary`, recorded by the
    runner), else the shared rule over the metrics it reports."""
    have: dict[str, set[str]] = defaultdict(set)
    for s in scores:
        have[s["task"]].add(s["metric"])
    declared = declared or {}
    return {t: declared[t] if declared.get(t) in ms else primary_metric(ms) for t, ms in have.items()}


def _primary(data: dict[str, Any]) -> dict[str, str]:
    return primary_metrics(data["scores"], data.get("meta", {}).get(PRIMARY_META))


def headline(
    data: dict[str, Any], k: int | None = None, metrics: dict[str, str] | None = None
) -> dict[tuple[str, str], dict[str, float]]:
    """(run_id, task) -> {mean, low, high} of the task's metric in `metrics` (default: its primary; a task not in
    `metrics` is left out) at k shots (default: the fewest), original instruction."""
    metrics = _primary(data) if metrics is None else metrics
    k = min((s["k"] for s in data["scores"]), default=0) if k is None else k
    return {(s["run_id"], s["task"]): {"mean": s["mean"], "low": s["ci_low"], "high": s["ci_high"]}
            for s in data["scores"] if s["metric"] == metrics.get(s["task"]) and s["k"] == k
            and s["variant"] == "original"}  # fmt: skip


# Kang et al. Table 2's rows, in its order: the first iteration by retrieval, then the second by instruction set
_SELF_SPEC_VARIANTS = {"it1": "self-specialized", "it1-marginalize": "it1, top-k docs marginalized",
                       "it1-top1": "it1, top-1 doc", "it1-none": "it1, no docs",
                       "it2-same": "it2, same instructions", "it2-new": "it2, new instructions"}  # fmt: skip


def self_spec_runs(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The self-specialized runs' ids in Table 2's order."""
    order = list(_SELF_SPEC_VARIANTS)
    ids = [k for k, r in runs.items() if r["generalist"] == SELF_SPEC]
    return sorted(ids, key=lambda i: (order.index(v) if (v := i.removeprefix(f"{SELF_SPEC}-")) in order else 99, i))


def self_spec_label(run_id: str, of: int = 1) -> str:
    """A self-specialized run's column name: "self-specialized" when it is the only one, else its variant."""
    variant = run_id.removeprefix(f"{SELF_SPEC}-")
    return "self-specialized" if of == 1 else f"self-specialized {_SELF_SPEC_VARIANTS.get(variant, variant)}"


def _columns(runs: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """Table 1 columns: base, generalist-only, specialist, specialist + generalist (largest amount); seeds pooled."""
    synth = self_spec_runs(runs)
    runs = {k: r for k, r in runs.items() if r["generalist"] != SELF_SPEC}
    top = max((r["amount"] for r in runs.values()), default=0)
    gens = sorted({r["generalist"] for r in runs.values()} - {"none"})
    cols = [("base", [k for k, r in runs.items() if r["weights"] is None])]
    cols += [(self_spec_label(i, len(synth)), [i]) for i in synth]
    for g in gens:
        cols.append((f"{g} only", [k for k, r in runs.items() if r["generalist"] == g and r["amount"] == 0]))
    if top:
        cols.append((f"specialist (n={top})", [k for k, r in runs.items()
                                                 if r["generalist"] == "none" and r["amount"] == top]))  # fmt: skip
        for g in gens:
            cols.append((f"specialist + {g} (n={top})",
                         [k for k, r in runs.items() if r["generalist"] == g and r["amount"] == top]))  # fmt: skip
    return [(name, ids) for name, ids in cols if ids]


# Marks a score whose model ranked the same option first for every example of the task: at the majority rate
# or below it, whatever the number, the model did not read the inputs.
ONE_ANSWER_MARK = "†"
ONE_ANSWER_NOTE = "† the model ranked the same option first for every test example of the task."

# More tasks than this are summarized by one pooled "all tasks" row and curve (a category such as SuperNI
# Sentiment expands into ~40 tasks; the paper reports their average).
MAX_TASK_CURVES = 4
ALL_TASKS = "all {n} tasks"


def task_groups(data: dict[str, Any]) -> dict[str, set[str]]:
    """The experiment's `report_groups` (e.g. skills: factual, reasoning), checked against what was evaluated."""
    evaluated = {s["task"] for s in data["scores"]}
    groups = {g: set(ts) for g, ts in data["meta"].get("config", {}).get("report_groups", {}).items()}
    for g, ts in groups.items():
        if missing := sorted(ts - evaluated):
            raise ConfigError(f"report_groups.{g}: {missing} were not evaluated (evaluated: {sorted(evaluated)})")
    return groups


def _over_seeds(
    data: dict[str, Any],
    run_ids: list[str],
    k: int,
    tasks: set[str] | None,
    single: dict[str, float] | None,
    metrics: dict[str, str] | None = None,
) -> dict[str, float] | None:
    """One table cell or curve point for runs that differ only by seed: the seed-averaged metric (`metrics`,
    default the primary) with a 95% bootstrap CI over examples (each example's score averaged over the seeds
    first). One run: its own score and CI (`single`)."""
    if not run_ids:
        return None
    if len(run_ids) == 1:
        return dict(single) if single is not None else None
    metrics = _primary(data) if metrics is None else metrics
    per_run = [_example_scores(data, i, metrics, k, tasks=tasks) for i in run_ids]
    common = [key for key in per_run[0] if all(key in p for p in per_run[1:])]  # in the predictions' order
    est = bootstrap_ci([statistics.mean(p[key] for p in per_run) for key in common], resamples=1000)
    return {"mean": est.mean, "low": est.low, "high": est.high, "seeds": len(run_ids)}


def _pooled(
    data: dict[str, Any], k: int, tasks: set[str] | None = None, metrics: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """run_id -> mean and 95% bootstrap CI of each task's metric in `metrics` (default: its primary) over every
    example of every such task (or of those in `tasks`) at k shots (with equal examples per task, the macro
    average)."""
    metrics = _primary(data) if metrics is None else metrics
    out = {}
    for run_id in data["runs"]:
        per_example = _example_scores(data, run_id, metrics, k, tasks=tasks)
        if per_example:
            est = bootstrap_ci(list(per_example.values()), resamples=1000)
            out[run_id] = {"mean": est.mean, "low": est.low, "high": est.high}
    return out


def table(data: dict[str, Any], metric: str | None = None) -> dict[str, Any]:
    """Rows: task (x k when several shot counts were evaluated); columns: see `_columns`. Each task is scored on
    its primary metric, or on `metric` (only the tasks that report it: e.g. ROUGE-L beside the primary F1)."""
    ks = sorted({s["k"] for s in data["scores"]})
    cols = _columns(data["runs"])
    answers = data.get("answers", {})
    if metric is None:
        metrics, pooled_name = _primary(data), "primary metric, pooled"
    else:
        metrics, pooled_name = {s["task"]: metric for s in data["scores"] if s["metric"] == metric}, f"{metric}, pooled"
    rows = []
    for k in ks:
        head = headline(data, k, metrics)
        evaluated = {t for _, t in head}
        tasks = sorted(evaluated)
        scope: dict[str, set[str] | None] = {t: {t} for t in tasks}  # the tasks each row pools
        if len(tasks) > 1:
            everything = ALL_TASKS.format(n=len(tasks))
            head |= {(i, everything): v for i, v in _pooled(data, k, metrics=metrics).items()}
            tasks.append(everything)
            scope[everything] = None
        for g, members in task_groups(data).items():
            if not (members := members & metrics.keys()) or (len(evaluated) > 1 and members == evaluated):
                continue  # a group none of whose tasks reports `metric`, or the "all tasks" row again
            label = f"{g} ({len(members)} task{'s' if len(members) != 1 else ''})"
            head |= {(i, label): v for i, v in _pooled(data, k, members, metrics).items()}
            tasks.append(label)
            scope[label] = members
        for t in tasks:
            cells = []
            for _, ids in cols:
                have = [i for i in ids if (i, t) in head]
                cell = _over_seeds(data, have, k, scope[t], head.get((have[0], t)) if have else None, metrics)
                if cell is not None:
                    cell["one_answer"] = all(len(answers.get(i, {}).get(t, ())) == 1 for i in ids)
                cells.append(cell)
            label = t if len(ks) == 1 else f"{t} (k={k})"
            rows.append({"task": label, "name": t, "k": k, "metric": metrics.get(t, pooled_name), "cells": cells})
    return {"columns": [c for c, _ in cols], "rows": rows}


def secondary_table(data: dict[str, Any], metric: str = "rouge_l") -> dict[str, Any] | None:
    """`table` on `metric` for the tasks that report it beside another primary metric (Kang et al. report ROUGE-L
    beside F1); None when no task does."""
    primary = _primary(data)
    if not any(s["metric"] == metric and primary[s["task"]] != metric for s in data["scores"]):
        return None
    return table(data, metric)


def over_shots(tab: dict[str, Any]) -> list[dict[str, Any]]:
    """Kang et al. Table 4: each row of `table` (a task or a pooled group) and column, the primary metric's worst,
    average and best over the evaluated shot counts (a column evaluated at fewer of them, such as a Table 2
    variant at k = 0 only, has no cell). Empty when one k was evaluated."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in tab["rows"]:
        by_name[r["name"]].append(r)
    if all(len(rows) < 2 for rows in by_name.values()):
        return []
    out = []
    for name, rows in by_name.items():
        cells: list[dict[str, float] | None] = []
        for i in range(len(tab["columns"])):
            means = [r["cells"][i]["mean"] for r in rows if r["cells"][i] is not None]
            cells.append({"worst": min(means), "average": statistics.mean(means), "best": max(means)}
                         if means and len(means) == len(rows) else None)  # fmt: skip
        out.append({"task": name, "metric": rows[0]["metric"], "ks": [r["k"] for r in rows], "cells": cells})
    return out


def shot_curves(tab: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float, float, float]]]]:
    """Kang et al. Table 1 as curves: each row of `table` (a task or a pooled group) -> column -> [(k, mean, low,
    high)] at every k the column was evaluated, ascending (a Table 2 variant evaluated at k = 0 only is one point).
    Empty when one k was evaluated."""
    if len({r["k"] for r in tab["rows"]}) < 2:
        return {}
    out: dict[str, dict[str, list[tuple[int, float, float, float]]]] = defaultdict(dict)
    for r in sorted(tab["rows"], key=lambda r: r["k"]):
        for column, c in zip(tab["columns"], r["cells"], strict=True):
            if c is not None:
                out[r["name"]].setdefault(column, []).append((r["k"], c["mean"], c["low"], c["high"]))
    return dict(out)


def curves(data: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float, float, float]]]]:
    """task (and 'mean') -> generalist -> [(amount, mean, low, high)] over seeds."""
    head = headline(data)
    tasks = {t for _, t in head}
    k0 = min((s["k"] for s in data["scores"]), default=0)
    pooled = len(tasks) > MAX_TASK_CURVES
    if pooled:
        head = {(i, ALL_TASKS.format(n=len(tasks))): v for i, v in _pooled(data, k0).items()}
    acc: dict[str, dict[str, dict[int, list[str]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run_id, task in head:
        r = data["runs"][run_id]
        if r["weights"] is None or r["generalist"] == SELF_SPEC:
            continue
        acc[task][r["generalist"]][r["amount"]].append(run_id)
    out: dict[str, dict[str, list]] = {}
    for task, by_gen in acc.items():
        scope = None if pooled else {task}
        out[task] = {}
        for g, by_amount in by_gen.items():
            points = []
            for a, ids in by_amount.items():
                c = _over_seeds(data, ids, k0, scope, head[(ids[0], task)])
                points.append((a, c["mean"], c["low"], c["high"]))
            out[task][g] = sorted(points)
    return out


def _example_scores(
    data: dict[str, Any],
    run_id: str,
    primary: dict[str, str],
    k: int,
    variant: str = "original",
    tasks: set[str] | None = None,
) -> dict[tuple[str, str], float]:
    """(task, example id) -> the task's metric in `primary` (the primary metrics, or one metric for the tasks that
    report it; other tasks are left out) for one run at k shots under one instruction variant (only `tasks`, when
    given)."""
    return {(t, i): v[primary[t]] for (t, kk, var, i), v in data["examples"][run_id].items()
            if kk == k and var == variant and t in primary and (tasks is None or t in tasks)}  # fmt: skip


def _paraphrase_variants(data: dict[str, Any], run_id: str) -> list[str]:
    return sorted({var for (_, _, var, _) in data["examples"][run_id]} - {"original"})


def _evaluated(run: dict[str, Any]) -> str:
    """The model name a run's predictions carry: its adapter ("run"), or the weights themselves ("base")."""
    return RUN if is_adapter(run["weights"]) else BASE


def _signed(d: Any) -> str:
    return f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


def _paired_difference(a: dict[tuple[str, str], float], b: dict[tuple[str, str], float]) -> tuple[Any, list]:
    """Paired bootstrap of a - b over the examples both have (None when they share none), and those examples."""
    keys = sorted(a.keys() & b.keys())
    return (paired_bootstrap([a[x] for x in keys], [b[x] for x in keys]).difference if keys else None), keys


def self_spec_findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Kang et al.'s Table 1, tested on these numbers: the self-specialized model beats its base model. Per shot
    count: paired bootstrap of (self-specialized - base), pooled over every task and over each report group's
    (e.g. the generation tasks apart from an option-ranking view)."""
    out = []
    for scope, tasks in [(None, None), *task_groups(data).items()]:
        out += _self_spec_gains(data, scope, tasks)
    return out


def _self_spec_gains(data: dict[str, Any], scope: str | None, tasks: set[str] | None) -> list[dict[str, Any]]:
    synth = self_spec_runs(data["runs"])
    base = [i for i, r in data["runs"].items() if r["weights"] is None]
    if not synth or not base:
        return []
    primary = _primary(data)
    where = f"[{scope}] " if scope else ""
    out = []
    for run_id in synth:
        who = "Self-specialization" if len(synth) == 1 else self_spec_label(run_id, len(synth)).capitalize()
        for k in sorted({s["k"] for s in data["scores"]}):
            a = _example_scores(data, run_id, primary, k, tasks=tasks)
            b = _example_scores(data, base[0], primary, k, tasks=tasks)
            d, keys = _paired_difference(a, b)
            if d is None:
                continue
            holds = d.low > 0
            text = (f"{where}{who} changes the score by {_signed(d)} points at "
                    f"k={k} ({len({t for t, _ in keys})} tasks, {len(keys)} examples): "
                    + ("better than the base model, as Kang et al. find" if holds else
                       "worse than the base model; the finding does not hold at this scale" if d.high < 0 else
                       "no significant gain over the base model; the finding does not hold at this scale"))  # fmt: skip
            out.append({"finding": "self-specialization", "scope": scope, "run": run_id, "k": k, "holds": holds,
                        "text": text, "gain": vars(d)})  # fmt: skip
    return out


def iterations_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Kang et al. Table 2: the base model and every self-specialized variant at the fewest shots, each as its
    primary metric and ROUGE-L pooled over the generation tasks (those scored by ROUGE-L, as all of the paper's
    are; equal examples per task: their average), with the paired bootstrap difference from the base on the
    primary metric. Empty unless there are several variants."""
    synth = self_spec_runs(data["runs"])
    base = next((i for i, r in data["runs"].items() if r["weights"] is None), None)
    if len(synth) < 2 or base is None:
        return []
    k0 = min(s["k"] for s in data["scores"])
    primary = _primary(data)
    with_rouge = {s["task"] for s in data["scores"] if s["metric"] == "rouge_l"}
    pooled = with_rouge or None  # without generation tasks: every task on its primary metric
    base_scores = _example_scores(data, base, primary, k0, tasks=pooled)
    rows = []
    for run_id in [base, *synth]:
        own = _example_scores(data, run_id, primary, k0, tasks=pooled)
        rouge = _example_scores(data, run_id, {t: "rouge_l" for t in with_rouge}, k0, tasks=with_rouge)
        d, _ = _paired_difference(own, base_scores) if run_id != base else (None, [])
        rows.append({"run": run_id, "label": "base" if run_id == base else self_spec_label(run_id, len(synth)),
                     "k": k0, "primary": statistics.mean(own.values()) if own else None,
                     "rouge_l": statistics.mean(rouge.values()) if rouge else None,
                     "vs_base": vars(d) if d is not None else None, "examples": len(own)})  # fmt: skip
    return rows


def _seed0(runs: dict[str, dict[str, Any]], generalist: str, amount: int) -> str | None:
    return next((i for i, r in runs.items()
                 if r["generalist"] == generalist and r["amount"] == amount and r["seed"] == 0), None)  # fmt: skip


def _paraphrased(data: dict[str, Any], run_id: str, primary: dict[str, str], k: int) -> dict[tuple[str, str], float]:
    """(task, example id) -> the primary metric averaged over the example's paraphrased instructions."""
    per_variant = [_example_scores(data, run_id, primary, k, v) for v in _paraphrase_variants(data, run_id)]
    keys = set.intersection(*(set(v) for v in per_variant)) if per_variant else set()
    return {x: statistics.mean(v[x] for v in per_variant) for x in keys}


def robustness(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Shi et al. Figure 4, per run: the primary metric under the original instruction and under paraphrases of
    it (mean, worst and best paraphrase), pooled over the tasks that have paraphrases, at the fewest shots."""
    primary = _primary(data)
    k0 = min((s["k"] for s in data["scores"]), default=0)
    out = []
    for run_id in sorted(data["runs"]):
        para = _paraphrased(data, run_id, primary, k0)
        if not para:
            continue
        orig = _example_scores(data, run_id, primary, k0)
        keys = sorted(para.keys() & orig.keys())
        variants = [_example_scores(data, run_id, primary, k0, v) for v in _paraphrase_variants(data, run_id)]
        per_variant = [[scores[x] for x in keys] for scores in variants]
        change = paired_bootstrap([para[x] for x in keys], [orig[x] for x in keys]).difference
        out.append({"run": run_id, "examples": len(keys), "paraphrases": len(per_variant),
                    "original": statistics.mean(orig[x] for x in keys),
                    "paraphrased": statistics.mean(para[x] for x in keys),
                    "worst": min(map(statistics.mean, per_variant)), "best": max(map(statistics.mean, per_variant)),
                    "change": vars(change)})  # fmt: skip
    return out


def robustness_findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Shi et al.'s Figure 4 finding, tested on these numbers: with generalist data the specialist scores better
    under paraphrased instructions. Paired bootstrap of (with - without) on the paraphrase-averaged score per
    example, at the largest specialist amount."""
    runs = data["runs"]
    primary = _primary(data)
    k0 = min((s["k"] for s in data["scores"]), default=0)
    top = max((r["amount"] for r in runs.values() if r["generalist"] != SELF_SPEC), default=0)
    without = _seed0(runs, "none", top)
    out = []
    for g in sorted({r["generalist"] for r in runs.values()} - {"none", SELF_SPEC}):
        with_g = _seed0(runs, g, top)
        if not top or with_g is None or without is None:
            continue
        a, b = _paraphrased(data, with_g, primary, k0), _paraphrased(data, without, primary, k0)
        d, keys = _paired_difference(a, b)
        if d is None:
            continue
        answers = data.get("answers", {}).get(with_g, {})
        constant = bool(answers) and all(len(a) == 1 for a in answers.values())
        # as for every other finding, it holds only when the paired CI excludes 0
        holds = None if constant else d.low > 0
        verdict = ("undetermined: with generalist data the model gives one answer to every example under every "
                   "instruction, so it is unchanged by rewording without reading it" if constant else
                   "more robust with generalist data, as the paper finds" if holds else
                   "less robust with generalist data; the paper's finding does not hold at this scale" if d.high < 0
                   else "no significant difference (the CI includes 0); the paper's finding does not hold at this "
                   "scale")  # fmt: skip
        text = (f"Under paraphrased instructions, generalist data ({g}) changes the specialist's score (n={top}) by "
                f"{_signed(d)} points ({len(keys)} examples): {verdict}")  # fmt: skip
        out.append({"finding": "paraphrase-robustness", "generalist": g, "holds": holds, "text": text,
                    "gain": vars(d)})  # fmt: skip
    return out


def findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Shi et al.'s central finding, tested on these numbers: generalist data helps the specialist most when
    task data is scarce. Per generalist source: paired bootstrap of (with - without) at the smallest and the
    largest specialist amount, pooled over tasks and examples (seed 0 runs); with two or more sources, each pair
    compared head to head (Figure 6); then the robustness and self-specialization findings."""
    out = []
    for scope, tasks in [(None, None), *task_groups(data).items()]:
        out += _generalist_gains(data, scope, tasks) + _source_contrasts(data, scope, tasks)
    return out + robustness_findings(data) + self_spec_findings(data)


def _grid(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    """The specialist amounts and the generalist sources (other than none) of a generalist-by-amount grid."""
    runs = data["runs"].values()
    amounts = sorted({r["amount"] for r in runs if r["amount"] > 0 and r["generalist"] != SELF_SPEC})
    return amounts, sorted({r["generalist"] for r in runs} - {"none", SELF_SPEC})


def _seed0_difference(data: dict[str, Any], a: str, b: str, amount: int, tasks: set[str] | None) -> Any:
    """Paired bootstrap of (generalist a - generalist b) at one specialist amount, seed 0, on the primary metric at
    the fewest shots, over the examples both were scored on; None when either run or a shared example is missing."""
    ra, rb = _seed0(data["runs"], a, amount), _seed0(data["runs"], b, amount)
    if ra is None or rb is None:
        return None
    primary = _primary(data)
    k0 = min((s["k"] for s in data["scores"]), default=0)
    d, _ = _paired_difference(_example_scores(data, ra, primary, k0, tasks=tasks),
                              _example_scores(data, rb, primary, k0, tasks=tasks))  # fmt: skip
    return d


def _source_contrasts(data: dict[str, Any], scope: str | None, tasks: set[str] | None) -> list[dict[str, Any]]:
    """Shi et al.'s Figure 6 compares generalist sources head to head (human-written LIMA vs GPT-4-written data):
    per pair of sources, a paired bootstrap of (a - b) at the smallest and the largest specialist amount, on the
    test examples both were scored on (seed 0 runs). The paper's expected sign depends on the skill measured, so
    the text states the difference and whether its CI excludes 0, not a verdict."""
    amounts, gens = _grid(data)
    where = f"[{scope}] " if scope else ""
    out = []
    for i, a in enumerate(gens):
        for b in gens[i + 1 :]:
            diffs = {}
            for n in sorted({amounts[0], amounts[-1]}) if amounts else []:
                d = _seed0_difference(data, a, b, n, tasks)
                if d is not None:
                    diffs[n] = d
            if not diffs:
                continue
            parts = [f"{_signed(d)} at n={n}" + ("" if d.low > 0 or d.high < 0 else " (CI includes 0)")
                     for n, d in diffs.items()]  # fmt: skip
            text = f"{where}Generalist {a} minus {b}, same specialist data and test examples: " + ", ".join(parts)
            out.append({"finding": "generalist-source", "scope": scope, "generalists": [a, b], "holds": None,
                        "text": text, "difference": {n: vars(d) for n, d in diffs.items()}})  # fmt: skip
    return out


def _generalist_gains(data: dict[str, Any], scope: str | None, tasks: set[str] | None) -> list[dict[str, Any]]:
    """The generalist-gain finding over every task (scope None) or over one report group's tasks."""
    amounts, gens = _grid(data)
    where = f"[{scope}] " if scope else ""
    out = []
    for g in gens:
        gains = {}
        for n in {amounts[0], amounts[-1]} if amounts else set():
            d = _seed0_difference(data, g, "none", n, tasks)
            if d is not None:
                gains[n] = d
        if len(gains) == 2:
            lo, hi = gains[amounts[0]], gains[amounts[-1]]
            # the paper's finding: generalist data helps when task data is scarce, and helps less as it grows; a
            # small-data gain whose CI includes 0 is noise, not the finding (as for every other finding here)
            holds = lo.low > 0 and lo.mean > hi.mean
            verdict = (
                "it helps most when task data is scarce, as the paper finds"
                if holds
                else "it does not help when task data is scarce; the paper's finding does not hold at this scale"
                if lo.mean <= 0
                else "it helps no more when task data is scarce; the paper's finding does not hold at this scale"
                if lo.mean <= hi.mean
                else "its larger gain when task data is scarce is within noise; the paper's finding is not shown"
                " at this scale"
            )
            text = (f"{where}Generalist data ({g}) adds {_signed(lo)} points with "
                    f"{amounts[0]} task examples and {_signed(hi)} "
                    f"with {amounts[-1]}: {verdict}"
                    + ("" if lo.low > 0 or lo.high < 0 else " (the small-data gain's CI includes 0)"))  # fmt: skip
            out.append({"finding": "generalist-gain", "scope": scope, "generalist": g, "holds": holds, "text": text,
                        "gain_small": vars(lo), "gain_large": vars(hi)})  # fmt: skip
        elif len(gains) == 1:
            ((n, d),) = gains.items()
            text = f"{where}Generalist data ({g}) adds {_signed(d)} points at n={n} (one amount: no trend to test)."
            out.append({"finding": "generalist-gain", "scope": scope, "generalist": g, "holds": None, "text": text,
                        "gain": vars(d)})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- rendering
