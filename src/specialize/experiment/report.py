"""`specialize report RUN_DIR`: render an experiment's numbers (`findings.py`) as PNG curves, one
self-contained HTML page (images inlined, no external assets), Markdown and JSON."""

from __future__ import annotations

import base64
import html
import json
import re
import textwrap
from pathlib import Path
from typing import Any

from specialize.config import ConfigError
from specialize.experiment.findings import (
    ONE_ANSWER_MARK,
    ONE_ANSWER_NOTE,
    curves,
    findings,
    iterations_table,
    load,
    over_shots,
    robustness,
    secondary_table,
    shot_curves,
    table,
)
from specialize.io import atomic_path, atomic_write_text
from specialize.synth.stats import funnel

# Kang et al. score every task by F1 and report ROUGE-L beside it: a report shows it as a second table for the
# tasks that record it while comparing on another metric.
SECONDARY_METRIC = "rouge_l"
SECONDARY_TITLE = "ROUGE-L beside the primary metric"


def _pyplot():
    """pyplot on the file-only Agg backend: a report is rendered on servers without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)
    return path


def plot_curves(cv: dict[str, dict[str, list]], path: Path) -> Path | None:
    if not any(len(pts) > 0 for by_gen in cv.values() for pts in by_gen.values()):
        return None
    plt = _pyplot()
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
    return _save(fig, path)


def plot_shots(tab: dict[str, Any], path: Path) -> Path | None:
    """Kang et al. Table 1 drawn: one panel per task (and pooled row), the primary metric at each k for the base
    and every self-specialized column, 95% CIs as error bars; None when one k was evaluated."""
    series = shot_curves(tab)
    if not series:
        return None
    plt = _pyplot()
    metric = {r["name"]: r["metric"] for r in tab["rows"]}
    ks = sorted({r["k"] for r in tab["rows"]})
    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, by_col) in zip(axes.flat, series.items(), strict=False):
        width = 0.5 / max(1, len(by_col))  # side by side within a k, so CIs do not hide each other
        for j, (column, pts) in enumerate(by_col.items()):
            xs = [ks.index(k) + (j - (len(by_col) - 1) / 2) * width for k, *_ in pts]
            means = [m for _, m, _, _ in pts]
            err = [[m - lo for _, m, lo, _ in pts], [hi - m for _, m, _, hi in pts]]
            ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, label=column, linestyle="-" if len(pts) > 1 else "")
        ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
        # wrapped: a pooled group's name ("options (accuracy, extra view) (3 tasks)") outgrows a panel
        ax.set_title("\n".join(textwrap.wrap(f"{name} ({metric[name]})", 44)), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("score (95% CI)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Shi et al. Figure 4 drawn: per run, the primary metric under the original instruction and averaged over its
    paraphrases (whisker: worst to best paraphrase), labelled with the paired change and its 95% CI."""
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(rows) + 1.5), 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.18 for x in xs], [r["original"] for r in rows], width=0.36, label="original instruction")
    para = [r["paraphrased"] for r in rows]
    err = [[p - r["worst"] for p, r in zip(para, rows, strict=True)],
           [r["best"] - p for p, r in zip(para, rows, strict=True)]]  # fmt: skip
    ax.bar([x + 0.18 for x in xs], para, width=0.36, yerr=err, capsize=4,
           label=f"paraphrased, mean of {rows[0]['paraphrases']} (worst to best)")  # fmt: skip
    top = max(max(r["original"], r["best"]) for r in rows)
    for x, r in zip(xs, rows, strict=True):
        c = r["change"]
        ax.annotate(f"{c['mean']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]", (x, top * 1.04 + 1), ha="center",
                    fontsize=8)  # fmt: skip
    ax.set_xticks(list(xs), [r["run"] for r in rows], fontsize=8)
    ax.set_ylim(0, top * 1.2 + 5)
    ax.set_ylabel(f"primary metric ({rows[0]['examples']} examples)")
    ax.set_title("original vs paraphrased instructions; change, paired 95% CI", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # below: bars fill the axes
    fig.tight_layout()
    return _save(fig, path)


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


def _html_table(tab: dict[str, Any], table_id: str) -> str:
    """A `table` as HTML: one row per task (and k), the metric beside the task's name, one cell per column."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in tab["columns"])
    body = "".join(f"<tr><td>{html.escape(r['task'])} <span class='ci'>{r['metric']}</span></td>"
                   + "".join(_cell(c) for c in r["cells"]) + "</tr>" for r in tab["rows"])  # fmt: skip
    return f'<table id="{table_id}"><tr><th>task</th>{head}</tr>{body}</table>'


def _secondary_section(second: dict[str, Any] | None) -> str:
    if second is None:
        return ""
    return (f"<h2>{SECONDARY_TITLE}</h2><p>The tasks that report it beside their primary metric, original "
            f"instruction, 95% bootstrap CI in brackets.</p>{_html_table(second, 'secondary')}")  # fmt: skip


def _in_grid_order(runs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Base first, then by generalist, amount and seed (numerically: n40 before n120)."""
    return sorted(runs.items(), key=lambda kv: (kv[1]["weights"] is not None, kv[1]["generalist"],
                                                kv[1]["amount"], kv[1]["seed"], kv[0]))  # fmt: skip


def _seconds(s: float | None) -> str:
    return "–" if s is None else f"{s:.0f}"


def _robustness_section(rows: list[dict[str, Any]], png: Path | None) -> str:
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
            f"{body}</table>{_img(png, 'original vs paraphrased instructions')}")  # fmt: skip


def _variant_cells(r: dict[str, Any]) -> list[str]:
    """One Table 2 row: label, pooled primary metric, pooled ROUGE-L, difference from the base."""
    d = r["vs_base"]
    return [r["label"], *("–" if r[m] is None else f"{r[m]:.1f}" for m in ("primary", "rouge_l")),
            "–" if d is None else f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"]  # fmt: skip


def _variants_section(data: dict[str, Any]) -> str:
    rows = iterations_table(data)
    if not rows:
        return ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _variant_cells(r)) + "</tr>" for r in rows)
    return (f"<h2>Self-specialization variants (Kang et al. Table 2)</h2><p>k={rows[0]['k']}; each task's primary "
            f"metric and ROUGE-L pooled over tasks; difference from the base by paired bootstrap.</p>"
            f"<table id='variants'><tr><th>model</th><th>primary (pooled)</th><th>ROUGE-L (pooled)</th>"
            f"<th>primary vs base</th></tr>{body}</table>")  # fmt: skip


def _over_shots_cell(c: dict[str, float] | None) -> str:
    return "–" if c is None else f"{c['worst']:.1f} / {c['average']:.1f} / {c['best']:.1f}"


def _shots_section(tab: dict[str, Any], png: Path | None) -> str:
    shots = over_shots(tab)
    if not shots:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in tab["columns"])
    body = "".join(
        f"<tr><td>{html.escape(r['task'])} <span class='ci'>{r['metric']}</span></td>"
        + "".join(f"<td>{_over_shots_cell(c)}</td>" for c in r["cells"])
        + "</tr>"
        for r in shots
    )
    ks = "/".join(map(str, shots[0]["ks"]))
    return (
        f"<h2>Worst / average / best over k = {ks}</h2><p>Kang et al. Table 4: the primary metric at each "
        f"shot count, summarized.</p><table id='over-shots'><tr><th>task</th>{head}</tr>{body}</table>"
        f"{_img(png, 'primary metric per shot count')}"
    )


def _synth_section(meta: dict[str, Any]) -> str:
    if "synth" not in meta:
        return ""
    d = Path(meta["synth"])
    stats = json.loads((d / "stats.json").read_text()) if (d / "stats.json").is_file() else {}
    steps = funnel(stats.get("filters", {}), stats.get("final_examples", 0))  # pipeline order, not alphabetical
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in steps)
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


def _page(title: str, body: str) -> str:
    """The one HTML page every report uses: title, the stylesheet, the body."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}\n</body></html>")  # fmt: skip


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _md_results(tab: dict[str, Any]) -> str:
    return _md_table(["task", *tab["columns"]],
                     [[f"{r['task']} ({r['metric']})", *map(_md_cell, r["cells"])] for r in tab["rows"]])  # fmt: skip


def _md_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    return f"{c['mean']:.1f}{ONE_ANSWER_MARK if c.get('one_answer') else ''} [{c['low']:.1f}, {c['high']:.1f}]"


def _md_img(png: Path | None, alt: str) -> str:
    """A figure beside report.md (they share the experiment directory), or nothing when it was not drawn."""
    return f"\n![{alt}]({png.name})\n" if png is not None else ""


def markdown(
    data: dict[str, Any],
    tab: dict,
    cv: dict,
    found: list[dict],
    robust: list[dict],
    figures: dict[str, Path | None],
    second: dict | None = None,
) -> str:
    """The report's numbers as Markdown (report.md), for papers, READMEs and docs/results.md; `figures` are the
    PNGs `render` drew (curves, shots, robustness); `second` the ROUGE-L table beside a primary F1."""
    cfg = data["meta"].get("config", {})
    parts = [
        f"# Experiment {cfg.get('name', '')}\n\n{cfg.get('description', '')}\n\n"
        f"Scale: {cfg.get('scale_note', '')}\n\n## Results (95% bootstrap CI; {ONE_ANSWER_NOTE})\n",
        _md_results(tab),
    ]
    if second is not None:
        parts.append(f"\n## {SECONDARY_TITLE} (95% bootstrap CI)\n" + _md_results(second))
    for task, by_gen in cv.items():
        amounts = sorted({p[0] for pts in by_gen.values() for p in pts})
        rows = []
        for g, pts in sorted(by_gen.items()):
            at = {a: {"mean": m, "low": lo, "high": hi} for a, m, lo, hi in pts}
            rows.append([g, *(_md_cell(at.get(a)) for a in amounts)])
        header = ["generalist", *(f"n={a}" for a in amounts)]
        parts.append(f"\n## Score vs specialist data: {task}\n" + _md_table(header, rows))
    if cv:
        parts.append(_md_img(figures.get("curves"), "score vs specialist data"))
    if shots := over_shots(tab):
        ks = "/".join(map(str, shots[0]["ks"]))
        rows = [[f"{r['task']} ({r['metric']})", *map(_over_shots_cell, r["cells"])] for r in shots]
        parts.append(f"\n## Worst / average / best over k = {ks} (Kang et al. Table 4)\n"
                     + _md_table(["task", *tab["columns"]], rows)
                     + _md_img(figures.get("shots"), "primary metric per shot count"))  # fmt: skip
    if variants := iterations_table(data):
        parts.append(f"\n## Self-specialization variants at k={variants[0]['k']} (Kang et al. Table 2)\n"
                     + _md_table(["model", "primary (pooled)", "ROUGE-L (pooled)", "primary vs base (paired 95% CI)"],
                                 [_variant_cells(r) for r in variants]))  # fmt: skip
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
            + _md_img(figures.get("robustness"), "original vs paraphrased instructions")
        )
    rows = [[k, _seconds(r["train_s"]), _seconds(r["eval_s"])] for k, r in _in_grid_order(data["runs"])]
    parts.append("\n## Runs (compute seconds, as first measured)\n"
                 + _md_table(["run", "train s (all its stages)", "eval s"], rows))  # fmt: skip
    return "".join(parts)


def _store(run_dir: Path) -> Path:
    db = run_dir / "results.sqlite"
    if not db.is_file():
        raise ConfigError(f"{db}: no results store; run `specialize run` first")
    return db


def render(run_dir: str | Path) -> Path:
    """Write `report.html`, `report.md`, `report.json` and the figures that apply (`curves.png`: score vs amount;
    `shots.png`: score per k; `robustness.png`: original vs paraphrased) into the experiment directory; returns
    the HTML."""
    run_dir = Path(run_dir)
    data = load(_store(run_dir))
    tab, cv, found, robust = table(data), curves(data), findings(data), robustness(data)
    second = secondary_table(data, SECONDARY_METRIC)
    figures = {
        "curves": plot_curves(cv, run_dir / "curves.png"),
        "shots": plot_shots(tab, run_dir / "shots.png"),
        "robustness": plot_robustness(robust, run_dir / "robustness.png"),
    }
    png = figures["curves"]
    cfg = data["meta"].get("config", {})
    atomic_write_text(run_dir / "report.json", json.dumps({"table": tab, "curves": cv, "findings": found,
                                                           "robustness": robust, "over_shots": over_shots(tab),
                                                           "variants": iterations_table(data),
                                                           "shot_curves": shot_curves(tab),
                                                           "secondary": second},
                                                          indent=1))  # fmt: skip
    atomic_write_text(run_dir / "report.md", markdown(data, tab, cv, found, robust, figures, second))
    finding_items = "".join(
        f"<li class='{'holds' if f['holds'] else 'fails' if f['holds'] is False else ''}'>{html.escape(f['text'])}</li>"
        for f in found
    )
    timings = "".join(f"<tr><td>{html.escape(k)}</td><td>{_seconds(r['train_s'])}</td><td>{_seconds(r['eval_s'])}</td>"
                      "</tr>" for k, r in _in_grid_order(data["runs"]))  # fmt: skip
    page = _page(
        f"specialize report: {cfg.get('name', '')}",
        f"""
<h1>Experiment {html.escape(cfg.get("name", run_dir.name))}</h1>
<p>{html.escape(cfg.get("description", ""))}</p><p class="ci">{html.escape(cfg.get("scale_note", ""))}</p>
<h2>Results</h2><p>Primary metric per task, original instruction, 95% bootstrap CI in brackets. {ONE_ANSWER_NOTE}</p>
{_html_table(tab, "results")}
{_secondary_section(second)}
{_shots_section(tab, figures["shots"])}
{_variants_section(data)}
<h2>Findings at this scale</h2><ul id="findings">{finding_items or "<li>no comparison to test in this grid</li>"}</ul>
<h2>Score vs specialist data</h2>{_img(png, "score vs specialist amount")}
{_robustness_section(robust, figures["robustness"])}
{_synth_section(data["meta"])}
<h2>Runs</h2><p class="ci">Seconds of compute behind each run, as first measured (a cached stage or evaluation
keeps its cost): training counts every stage of the run, so a shared stage appears in each run built on it.</p>
<table><tr><th>run</th><th>train s</th><th>eval s</th></tr>{timings}</table>""",
    )
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
    page = _page(
        "specialize: experiments compared",
        f"<h1>Experiments compared</h1><table id='results'><tr>"
        f"<th>experiment</th>{head}</tr>{body}</table><h2>Findings at this scale</h2><ul>{items}</ul>",
    )
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
