"""`specialize report RUN_DIR`: paper-style tables, curves with CI bands, findings computed from the numbers,
and one self-contained HTML file (images inlined, no external assets)."""

from __future__ import annotations

import base64
import html
import json
import re
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from specialize.config import ConfigError
from specialize.eval.stats import bootstrap_ci, paired_bootstrap
from specialize.experiment.runner import SELF_SPEC, is_adapter
from specialize.io import atomic_path, atomic_write_text

# A task's primary metric is the first of these it has. Token F1 before exact match: Shi et al. report F1 for
# factual knowledge (Table 2), and its partial credit still separates small models that EM scores all 0.
METRIC_ORDER = ("accuracy", "rouge_l", "token_f1", "exact_match", "entity_f1", "accuracy_norm")


def load(db_path: Path) -> dict[str, Any]:
    db = sqlite3.connect(db_path)
    runs = {r[0]: dict(zip(("run_id", "model", "generalist", "amount", "seed", "weights", "eval_dir", "config",
                            "train_s", "eval_s", "finished"), r, strict=True))
            for r in db.execute("SELECT * FROM runs")}  # fmt: skip
    scores = [dict(zip(("run_id", "task", "k", "variant", "split", "metric", "mean", "ci_low", "ci_high", "n"), r,
                       strict=True)) for r in db.execute("SELECT * FROM scores")]  # fmt: skip
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    return {
        "runs": runs,
        "scores": scores,
        "meta": meta,
        **read_predictions(runs),
    }


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
        for line in (Path(r["eval_dir"]) / "predictions.jsonl").read_text().splitlines():
            p = json.loads(line)
            if p["model"] != model:
                continue
            rows[(p["task"], p["k"], p["variant"], p["id"])] = p["scores"]
            if "option_logprobs" in p:
                tasks.setdefault(p["task"], set()).add(p["prediction"])
    return {"examples": examples, "answers": answers}


def primary_metrics(scores: list[dict[str, Any]]) -> dict[str, str]:
    have: dict[str, set[str]] = defaultdict(set)
    for s in scores:
        have[s["task"]].add(s["metric"])
    return {t: next((m for m in METRIC_ORDER if m in ms), sorted(ms)[0]) for t, ms in have.items()}


def headline(data: dict[str, Any], k: int | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """(run_id, task) -> {mean, low, high} of the task's primary metric at k shots (default: the fewest),
    original instruction."""
    primary = primary_metrics(data["scores"])
    k = min((s["k"] for s in data["scores"]), default=0) if k is None else k
    return {(s["run_id"], s["task"]): {"mean": s["mean"], "low": s["ci_low"], "high": s["ci_high"]}
            for s in data["scores"] if s["metric"] == primary[s["task"]] and s["k"] == k
            and s["variant"] == "original"}  # fmt: skip


def _columns(runs: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """Table 1 columns: base, generalist-only, specialist, specialist + generalist (largest amount); seeds pooled."""
    synth = [k for k, r in runs.items() if r["generalist"] == SELF_SPEC]
    runs = {k: r for k, r in runs.items() if r["generalist"] != SELF_SPEC}
    top = max((r["amount"] for r in runs.values()), default=0)
    gens = sorted({r["generalist"] for r in runs.values()} - {"none"})
    cols = [("base", [k for k, r in runs.items() if r["weights"] is None]), ("self-specialized", synth)]
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


def _pooled(data: dict[str, Any], k: int, tasks: set[str] | None = None) -> dict[str, dict[str, float]]:
    """run_id -> mean and 95% bootstrap CI of the primary metric over every example of every task (or of
    `tasks`) at k shots (with equal examples per task, the macro average)."""
    primary = primary_metrics(data["scores"])
    out = {}
    for run_id in data["runs"]:
        per_example = _example_scores(data, run_id, primary, k, tasks=tasks)
        if per_example:
            est = bootstrap_ci(list(per_example.values()), resamples=1000)
            out[run_id] = {"mean": est.mean, "low": est.low, "high": est.high}
    return out


def table(data: dict[str, Any]) -> dict[str, Any]:
    """Rows: task (x k when several shot counts were evaluated); columns: see `_columns`."""
    ks = sorted({s["k"] for s in data["scores"]})
    cols = _columns(data["runs"])
    answers = data.get("answers", {})
    metrics = primary_metrics(data["scores"])
    rows = []
    for k in ks:
        head = headline(data, k)
        tasks = sorted({t for _, t in head})
        if len(tasks) > 1:
            everything = ALL_TASKS.format(n=len(tasks))
            head |= {(i, everything): v for i, v in _pooled(data, k).items()}
            tasks.append(everything)
        for g, members in task_groups(data).items():
            label = f"{g} ({len(members)} task{'s' if len(members) != 1 else ''})"
            head |= {(i, label): v for i, v in _pooled(data, k, members).items()}
            tasks.append(label)
        for t in tasks:
            cells = []
            for _, ids in cols:
                vals = [head[(i, t)] for i in ids if (i, t) in head]
                cells.append({"mean": statistics.mean(v["mean"] for v in vals), "low": min(v["low"] for v in vals),
                              "high": max(v["high"] for v in vals),
                              "one_answer": all(len(answers.get(i, {}).get(t, ())) == 1 for i in ids)}
                             if vals else None)  # fmt: skip
            label = t if len(ks) == 1 else f"{t} (k={k})"
            rows.append({"task": label, "metric": metrics.get(t, "primary metric, pooled"), "cells": cells})
    return {"columns": [c for c, _ in cols], "rows": rows}


def curves(data: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float, float, float]]]]:
    """task (and 'mean') -> generalist -> [(amount, mean, low, high)] over seeds."""
    head = headline(data)
    tasks = {t for _, t in head}
    if len(tasks) > MAX_TASK_CURVES:
        k0 = min(s["k"] for s in data["scores"])
        head = {(i, ALL_TASKS.format(n=len(tasks))): v for i, v in _pooled(data, k0).items()}
    acc: dict[str, dict[str, dict[int, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for (run_id, task), v in head.items():
        r = data["runs"][run_id]
        if r["weights"] is None or r["generalist"] == SELF_SPEC:
            continue
        acc[task][r["generalist"]][r["amount"]].append(v)
    out: dict[str, dict[str, list]] = {}
    for task, by_gen in acc.items():
        out[task] = {g: sorted((a, statistics.mean(x["mean"] for x in vs), min(x["low"] for x in vs),
                                max(x["high"] for x in vs)) for a, vs in by_amount.items())
                     for g, by_amount in by_gen.items()}  # fmt: skip
    return out


def _example_scores(
    data: dict[str, Any],
    run_id: str,
    primary: dict[str, str],
    k: int,
    variant: str = "original",
    tasks: set[str] | None = None,
) -> dict[tuple[str, str], float]:
    """(task, example id) -> the task's primary metric for one run at k shots under one instruction variant
    (only `tasks`, when given)."""
    return {(t, i): v[primary[t]] for (t, kk, var, i), v in data["examples"][run_id].items()
            if kk == k and var == variant and (tasks is None or t in tasks)}  # fmt: skip


def _paraphrase_variants(data: dict[str, Any], run_id: str) -> list[str]:
    return sorted({var for (_, _, var, _) in data["examples"][run_id]} - {"original"})


def _evaluated(run: dict[str, Any]) -> str:
    """The model name a run's predictions carry: its adapter ("run"), or the weights themselves ("base")."""
    return "run" if is_adapter(run["weights"]) else "base"


def _signed(d: Any) -> str:
    return f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


def _paired_difference(a: dict[tuple[str, str], float], b: dict[tuple[str, str], float]) -> tuple[Any, list]:
    """Paired bootstrap of a - b over the examples both have (None when they share none), and those examples."""
    keys = sorted(a.keys() & b.keys())
    return (paired_bootstrap([a[x] for x in keys], [b[x] for x in keys]).difference if keys else None), keys


def self_spec_findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Kang et al.'s Table 1, tested on these numbers: the self-specialized model beats its base model. Per shot
    count: paired bootstrap of (self-specialized - base), pooled over tasks and examples."""
    runs = data["runs"].items()
    synth = [i for i, r in runs if r["generalist"] == SELF_SPEC]
    base = [i for i, r in runs if r["weights"] is None]
    if not synth or not base:
        return []
    primary = primary_metrics(data["scores"])
    out = []
    for k in sorted({s["k"] for s in data["scores"]}):
        a = _example_scores(data, synth[0], primary, k)
        b = _example_scores(data, base[0], primary, k)
        d, keys = _paired_difference(a, b)
        if d is None:
            continue
        holds = d.low > 0
        text = (f"Self-specialization changes the score by {_signed(d)} points at "
                f"k={k} ({len({t for t, _ in keys})} tasks, {len(keys)} examples): "
                + ("better than the base model, as Kang et al. find" if holds else
                   "no significant gain over the base model; the finding does not hold at this scale"))  # fmt: skip
        out.append({"finding": "self-specialization", "k": k, "holds": holds, "text": text, "gain": vars(d)})
    return out


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
    primary = primary_metrics(data["scores"])
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
    primary = primary_metrics(data["scores"])
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
        holds = None if constant else d.mean > 0
        verdict = ("undetermined: with generalist data the model gives one answer to every example under every "
                   "instruction, so it is unchanged by rewording without reading it" if constant else
                   "more robust with generalist data, as the paper finds" if holds else
                   "no more robust with generalist data; the paper's finding does not hold at this scale")  # fmt: skip
        text = (f"Under paraphrased instructions, generalist data ({g}) changes the specialist's score (n={top}) by "
                f"{_signed(d)} points ({len(keys)} examples): {verdict}"
                + ("" if d.low > 0 or d.high < 0 else " (the CI includes 0)"))  # fmt: skip
        out.append({"finding": "paraphrase-robustness", "generalist": g, "holds": holds, "text": text,
                    "gain": vars(d)})  # fmt: skip
    return out


def findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Shi et al.'s central finding, tested on these numbers: generalist data helps the specialist most when
    task data is scarce. Per generalist source: paired bootstrap of (with - without) at the smallest and the
    largest specialist amount, pooled over tasks and examples (seed 0 runs)."""
    out = []
    for scope, tasks in [(None, None), *task_groups(data).items()]:
        out += _generalist_gains(data, scope, tasks)
    return out + robustness_findings(data) + self_spec_findings(data)


def _generalist_gains(data: dict[str, Any], scope: str | None, tasks: set[str] | None) -> list[dict[str, Any]]:
    """The generalist-gain finding over every task (scope None) or over one report group's tasks."""
    runs = data["runs"]
    primary = primary_metrics(data["scores"])
    k0 = min((s["k"] for s in data["scores"]), default=0)
    amounts = sorted({r["amount"] for r in runs.values() if r["amount"] > 0 and r["generalist"] != SELF_SPEC})
    gens = sorted({r["generalist"] for r in runs.values()} - {"none", SELF_SPEC})
    where = f"[{scope}] " if scope else ""
    out = []
    for g in gens:
        gains = {}
        for n in {amounts[0], amounts[-1]} if amounts else set():
            with_g, without = _seed0(runs, g, n), _seed0(runs, "none", n)
            if with_g is None or without is None:
                continue
            a = _example_scores(data, with_g, primary, k0, tasks=tasks)
            b = _example_scores(data, without, primary, k0, tasks=tasks)
            d, _ = _paired_difference(a, b)
            if d is not None:
                gains[n] = d
        if len(gains) == 2:
            lo, hi = gains[amounts[0]], gains[amounts[-1]]
            # the paper's finding: generalist data helps when task data is scarce, and helps less as it grows
            holds = lo.mean > 0 and lo.mean > hi.mean
            verdict = (
                "it helps most when task data is scarce, as the paper finds"
                if holds
                else "it does not help when task data is scarce; the paper's finding does not hold at this scale"
                if lo.mean <= 0
                else "it helps no more when task data is scarce; the paper's finding does not hold at this scale"
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


def plot_curves(cv: dict[str, dict[str, list]], path: Path) -> Path | None:
    if not any(len(pts) > 0 for by_gen in cv.values() for pts in by_gen.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(cv)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for g, pts in sorted(cv[task].items()):
            pts = [p for p in pts if p[0] > 0] or pts
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label="no generalist" if g == "none" else g)
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("specialist examples")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _img(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(c: dict[str, float] | None) -> str:
    if c is None:
        return "<td>-</td>"
    mark = ONE_ANSWER_MARK if c.get("one_answer") else ""
    return f'<td>{c["mean"]:.1f}{mark}<span class="ci"> [{c["low"]:.1f}, {c["high"]:.1f}]</span></td>'


def _in_grid_order(runs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Base first, then by generalist, amount and seed (numerically: n40 before n120)."""
    return sorted(runs.items(), key=lambda kv: (kv[1]["weights"] is not None, kv[1]["generalist"],
                                                kv[1]["amount"], kv[1]["seed"], kv[0]))  # fmt: skip


def _seconds(s: float | None) -> str:
    return "–" if s is None else f"{s:.0f}"


def _robustness_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(r['run'])}</td><td>{r['original']:.1f}</td><td>{r['paraphrased']:.1f}</td>"
        f"<td>{r['worst']:.1f}</td><td>{r['best']:.1f}</td><td>{r['change']['mean']:+.1f} "
        f"<span class='ci'>[{r['change']['low']:+.1f}, {r['change']['high']:+.1f}]</span></td></tr>"
        for r in rows
    )
    n = rows[0]["paraphrases"]
    return (f"<h2>Robustness to paraphrased instructions</h2><p>Primary metric pooled over the tasks with "
            f"paraphrases ({rows[0]['examples']} examples); {n} paraphrases; change = paraphrased - original, "
            "paired bootstrap 95% CI.</p><table id='robustness'><tr><th>run</th><th>original</th>"
            "<th>paraphrased (mean)</th><th>worst</th><th>best</th><th>change</th></tr>"
            f"{body}</table>")  # fmt: skip


def _synth_section(meta: dict[str, Any]) -> str:
    if "synth" not in meta:
        return ""
    d = Path(meta["synth"])
    stats = json.loads((d / "stats.json").read_text()) if (d / "stats.json").is_file() else {}
    counts = {**stats.get("filters", {}), "final examples": stats.get("final_examples", 0)}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    examples = []
    if (d / "data.jsonl").is_file():
        for line in (d / "data.jsonl").read_text().splitlines()[:5]:
            e = json.loads(line)
            docs = e["metadata"]["provenance"]["docs"]
            examples.append(f"<li><b>{html.escape(e['instruction'])}</b>"
                            + (f"<br><i>input:</i> {html.escape(e['input'])}" if e["input"] else "")
                            + f"<br><i>response:</i> {html.escape(e['output'])}"
                            f"<br><span class='ci'>grounded in {html.escape(', '.join(docs))}</span></li>")  # fmt: skip
    return (f"<h2>Self-specialization round</h2><p>{html.escape(str(d))}</p><table><tr><th>stage</th>"
            f"<th>count</th></tr>{rows}</table>{_img(d / 'stats.png', 'synthetic data statistics')}"
            f"<h3>Generated examples</h3><ol>{''.join(examples)}</ol>")  # fmt: skip


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}.ci{color:#888;font-size:.8em}img{max-width:100%}
.holds{color:#1a7f37}.fails{color:#b42318}"""


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _md_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    return f"{c['mean']:.1f}{ONE_ANSWER_MARK if c.get('one_answer') else ''} [{c['low']:.1f}, {c['high']:.1f}]"


def markdown(data: dict[str, Any], tab: dict, cv: dict, found: list[dict], robust: list[dict]) -> str:
    """The report's numbers as Markdown (report.md), for papers, READMEs and docs/results.md."""
    cfg = data["meta"].get("config", {})
    parts = [
        f"# Experiment {cfg.get('name', '')}\n\n{cfg.get('description', '')}\n\n"
        f"Scale: {cfg.get('scale_note', '')}\n\n## Results (95% bootstrap CI; {ONE_ANSWER_NOTE})\n",
        _md_table(
            ["task", *tab["columns"]],
            [[f"{r['task']} ({r['metric']})", *map(_md_cell, r["cells"])] for r in tab["rows"]],
        ),
    ]
    for task, by_gen in cv.items():
        amounts = sorted({p[0] for pts in by_gen.values() for p in pts})
        rows = []
        for g, pts in sorted(by_gen.items()):
            at = {a: {"mean": m, "low": lo, "high": hi} for a, m, lo, hi in pts}
            rows.append([g, *(_md_cell(at.get(a)) for a in amounts)])
        header = ["generalist", *(f"n={a}" for a in amounts)]
        parts.append(f"\n## Score vs specialist data: {task}\n" + _md_table(header, rows))
    texts = [f["text"] for f in found] or ["no comparison to test in this grid"]
    parts.append("\n## Findings at this scale\n" + "".join(f"- {t}\n" for t in texts))
    if robust:
        rows = [[r["run"], *(f"{r[c]:.1f}" for c in ("original", "paraphrased", "worst", "best")),
                 _md_cell(r["change"])]
                for r in robust]  # fmt: skip
        parts.append(
            f"\n## Robustness to paraphrased instructions ({robust[0]['paraphrases']} paraphrases, "
            f"{robust[0]['examples']} examples)\n"
            + _md_table(["run", "original", "paraphrased (mean)", "worst", "best", "change (paired 95% CI)"], rows)
        )
    rows = [[k, _seconds(r["train_s"]), _seconds(r["eval_s"])] for k, r in _in_grid_order(data["runs"])]
    parts.append("\n## Runs (compute seconds, as first measured)\n"
                 + _md_table(["run", "train s (all its stages)", "eval s"], rows))  # fmt: skip
    return "".join(parts)


def _store(run_dir: Path) -> Path:
    db = run_dir / "results.sqlite"
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no results store; run `specialize run` first")
    return db


def render(run_dir: str | Path) -> Path:
    """Write `report.html`, `report.md`, `report.json` and `curves.png` into the experiment directory; returns the
    HTML."""
    run_dir = Path(run_dir)
    data = load(_store(run_dir))
    tab, cv, found, robust = table(data), curves(data), findings(data), robustness(data)
    png = plot_curves(cv, run_dir / "curves.png")
    cfg = data["meta"].get("config", {})
    atomic_write_text(run_dir / "report.json", json.dumps({"table": tab, "curves": cv, "findings": found,
                                                           "robustness": robust}, indent=1))  # fmt: skip
    atomic_write_text(run_dir / "report.md", markdown(data, tab, cv, found, robust))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in tab["columns"])
    body = "".join(f"<tr><td>{html.escape(r['task'])} <span class='ci'>{r['metric']}</span></td>"
                   + "".join(_cell(c) for c in r["cells"]) + "</tr>" for r in tab["rows"])  # fmt: skip
    finding_items = "".join(
        f"<li class='{'holds' if f['holds'] else 'fails' if f['holds'] is False else ''}'>{html.escape(f['text'])}</li>"
        for f in found
    )
    timings = "".join(f"<tr><td>{html.escape(k)}</td><td>{_seconds(r['train_s'])}</td><td>{_seconds(r['eval_s'])}</td>"
                      "</tr>" for k, r in _in_grid_order(data["runs"]))  # fmt: skip
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>specialize report: {html.escape(cfg.get("name", ""))}</title>
<style>{CSS}</style></head><body>
<h1>Experiment {html.escape(cfg.get("name", run_dir.name))}</h1>
<p>{html.escape(cfg.get("description", ""))}</p><p class="ci">{html.escape(cfg.get("scale_note", ""))}</p>
<h2>Results</h2><p>Primary metric per task, original instruction, 95% bootstrap CI in brackets. {ONE_ANSWER_NOTE}</p>
<table id="results"><tr><th>task</th>{head}</tr>{body}</table>
<h2>Findings at this scale</h2><ul id="findings">{finding_items or "<li>no comparison to test in this grid</li>"}</ul>
<h2>Score vs specialist data</h2>{_img(png, "score vs specialist amount")}
{_robustness_section(robust)}
{_synth_section(data["meta"])}
<h2>Runs</h2><p class="ci">Seconds of compute behind each run, as first measured (a cached stage or evaluation
keeps its cost): training counts every stage of the run, so a shared stage appears in each run built on it.</p>
<table><tr><th>run</th><th>train s</th><th>eval s</th></tr>{timings}</table>
</body></html>"""  # noqa: E501
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out


# ------------------------------------------------------------------------------------------- several experiments


def summary_row(tab: dict[str, Any]) -> dict[str, Any]:
    """An experiment's one-line result: its pooled "all N tasks" row at the fewest shots, or its only task."""
    return next((r for r in tab["rows"] if r["task"].startswith("all ")), tab["rows"][0])


def combine(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Shi et al.'s Table 1 across experiments: one row per experiment (a coverage level, a skill set), columns
    by role (base, generalist only, specialist, specialist + generalist at the experiment's largest amount),
    each experiment's findings below. Writes report.md, report.json and a self-contained report.html."""
    rows, columns, found = [], [], []
    for d in map(Path, run_dirs):
        data = load(_store(d))
        tab = table(data)
        row = summary_row(tab)
        amounts = sorted(set(re.findall(r"\(n=(\d+)\)", " ".join(tab["columns"]))))
        cells = {re.sub(r" \(n=\d+\)", "", c): v for c, v in zip(tab["columns"], row["cells"], strict=True)}
        columns += [c for c in cells if c not in columns]
        name = data["meta"].get("config", {}).get("name", d.name)
        label = f"{name}: {row['task']}" + (f", n={amounts[-1]}" if amounts else "")
        rows.append((label, row["metric"], cells))
        found += [f"{name}: {f['text']}" for f in findings(data)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_rows = [[f"{label} ({metric})", *(_md_cell(cells.get(c)) for c in columns)] for label, metric, cells in rows]
    md = ("# Experiments compared\n\nOne row per experiment: its pooled result (primary metric, 95% bootstrap "
          "CI), specialists at the experiment's largest amount.\n\n" + _md_table(["experiment", *columns], table_rows)
          + "\n## Findings at this scale\n" + "".join(f"- {t}\n" for t in found))  # fmt: skip
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.json", json.dumps({"columns": columns, "rows": [
        {"experiment": label, "metric": metric, "cells": [cells.get(c) for c in columns]}
        for label, metric, cells in rows], "findings": found}, indent=1))  # fmt: skip
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{html.escape(label)} <span class='ci'>{metric}</span></td>"
        + "".join(_cell(cells.get(c)) for c in columns)
        + "</tr>"
        for label, metric, cells in rows
    )
    items = "".join(f"<li>{html.escape(t)}</li>" for t in found)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>specialize: experiments compared</title>"
            f"<style>{CSS}</style></head><body><h1>Experiments compared</h1><table id='results'><tr><th>experiment"
            f"</th>{head}</tr>{body}</table><h2>Findings at this scale</h2><ul>{items}</ul></body></html>")  # fmt: skip
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
