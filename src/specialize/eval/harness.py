"""The evaluation harness: models (base and adapters) x tasks x k-shot x instruction variants.

    specialize eval CONFIG.yaml            # or: specialize eval --task fpb --adapter biomed=runs/x/adapter

Writes results/<run>/predictions.jsonl (one line per model/task/k/variant/example), summary.json (every
score with its bootstrap 95% CI, k-shot worst/average/best, paraphrase spread, held-out vs train, paired
comparisons of each adapter against the base) and manifest.json, then prints a table.

Resumable: each finished (model, task, k, instruction) unit is appended to `predictions.partial.jsonl` as it
is computed; a rerun of the same evaluation skips the units found there, and ends with the same files as an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from specialize import models
from specialize.config import BASE, ConfigError, ModelConfig, TemplateName
from specialize.data import Example
from specialize.eval.metrics import METRICS
from specialize.eval.options import score_options
from specialize.eval.results import (
    Comparison,
    Estimate,
    KShot,
    Prediction,
    Robustness,
    ScoreEntry,
    SplitMean,
    Summary,
)
from specialize.eval.stats import bootstrap_ci, paired_bootstrap
from specialize.eval.tasks import LoadedTask, load_task_spec, load_tasks, read_split_file, with_demos, with_instruction
from specialize.generation.engines import TextEngine, engine_for
from specialize.generation.lora import NO_ADAPTER
from specialize.hashing import file_sha256, fingerprint, lines_sha256, text_sha256
from specialize.io import append_log, atomic_path, atomic_write_text, read_log
from specialize.prompts import encode_prompt, render_prompt


class EvalSettings(BaseModel):
    """What to evaluate on and how: the part of an evaluation an experiment declares once for all its runs."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str | dict[str, Any]] = Field(min_length=1)
    shots: list[NonNegativeInt] | None = Field(None, description="overrides every task's shots")
    limit: int | None = Field(None, ge=1, description="overrides every task's limit")
    split_file: str | None = None
    batch_size: int = Field(8, ge=1)
    bootstrap_resamples: int = Field(1000, ge=100)


class EvalConfig(EvalSettings):
    """An evaluation run: settings + which model and adapters, where the results go."""

    model: ModelConfig = ModelConfig()
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> PEFT adapter directory")
    include_base: bool = True
    data_root: str = "../shared/data"
    template: TemplateName | None = Field(
        None, description="None: each checkpoint's own (stored by training), Alpaca for a plain base model"
    )
    output_dir: str = "results/eval"
    seed: int = 0


def _variants(task: LoadedTask) -> list[tuple[str, str | None]]:
    """(label, instruction override): the original instruction, then each paraphrase."""
    return [("original", None)] + [(f"paraphrase-{i + 1}", p) for i, p in enumerate(task.spec.paraphrases)]


def _units(
    tasks: list[LoadedTask], shots_override: list[int] | None
) -> Iterator[tuple[LoadedTask, int, str, str | None]]:
    for task in tasks:
        for k in shots_override or task.spec.shots or [0]:
            for label, instruction in _variants(task):
                yield task, k, label, instruction


def prepare(cfg: EvalConfig) -> tuple[list[LoadedTask], dict[str, str]]:
    """Load and check every task and adapter before any model work."""
    for name, path in cfg.adapters.items():
        try:
            models.check_adapter(name, path)
        except models.ModelLoadError as e:
            raise ConfigError(str(e)) from None
    if not cfg.include_base and not cfg.adapters:
        raise ConfigError("nothing to evaluate: include_base is false and no adapters are given")
    overrides = {"limit": cfg.limit} if cfg.limit is not None else None
    tasks = [t for ref in cfg.tasks for t in load_tasks(load_task_spec(ref, cfg.data_root, overrides), cfg.seed)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    for task, k, _, _ in _units(tasks, cfg.shots):
        if k and (short := [e for e in task.examples if task.max_shots(e) < k]):
            raise ConfigError(
                f"task {task.name}: {task.max_shots(short[0])} demonstrations cannot give k={k} "
                f"(test example {short[0].id}; {len(short)} example(s) short)"
            )
    splits = read_split_file(cfg.split_file) if cfg.split_file else {}
    return tasks, splits


def _predict(rt: models.Runtime, engine: TextEngine, name: str, task: LoadedTask, examples: list[Example],
             batch_size: int):  # fmt: skip
    """Predictions and per-option scores of model `name` (the base or an adapter) for prepared examples (demos
    and instruction already applied), in that model's own template. Option ranking scores on the transformers
    model whatever the engine; generation runs on `engine`."""
    template, tokenizer = rt.prompt_template(name), rt.tokenizer
    prompts = [render_prompt(e, template) for e in examples]
    if task.spec.protocol == "options":
        options = [list(task.options or e.options or ()) for e in examples]
        ids = [encode_prompt(p, template, tokenizer) for p in prompts]
        scored = score_options(rt.model, tokenizer, ids, options, batch_size=batch_size, precision=rt.precision)
        preds = []
        for s in scored:
            best_sum = max(s, key=lambda o: o.logprob)
            best_norm = max(s, key=lambda o: o.per_char)
            preds.append(
                {
                    "prediction": best_sum.option,
                    "prediction_norm": best_norm.option,
                    "option_logprobs": {o.option: o.logprob for o in s},
                }
            )
        return prompts, preds
    from specialize.generation import SamplingParams, prompt_requests

    params = SamplingParams(max_new_tokens=task.spec.max_new_tokens, stop=tuple(task.spec.stop))
    adapter = NO_ADAPTER if name == BASE else name  # named per request: an engine may not see `_as_model`
    outs = engine.run(prompt_requests(tokenizer, prompts, template, params, adapter=adapter))
    return prompts, [{"prediction": o.text.strip(), "finish_reason": o.finish_reason} for o in outs]


def _score(task: LoadedTask, example: Example, pred: dict[str, Any]) -> dict[str, float]:
    scores = {m: METRICS[m](pred["prediction"], list(example.references)) for m in task.spec.metric_names}
    if "prediction_norm" in pred:
        scores["accuracy_norm"] = METRICS["accuracy"](pred["prediction_norm"], list(example.references))
    return scores


PARAPHRASE_PROMPT = (
    "Rewrite the following task instruction in different words. Keep its meaning and every requirement; "
    "reply with the rewritten instruction only.\n\nInstruction: {instruction}"
)


def paraphrase_problem(text: str, instruction: str, accepted: list[str]) -> str | None:
    """Why a sampled rewrite is not a usable paraphrase of `instruction` (None: it is one). Small models often
    echo a template header ("### Instructions:") or a fragment; scoring those would measure noise, not
    robustness to rewording."""
    words, original = len(text.split()), len(instruction.split())
    if not text:
        return "empty"
    if text == instruction or text in accepted:
        return "duplicate"
    if text.startswith("#") or text.rstrip().endswith(":"):
        return "header"
    if words < max(3, original // 3) or words > 3 * original + 10:
        return "length"
    return None


def generate_paraphrases(
    rt: models.Runtime, task: LoadedTask, seed: int, engine: TextEngine | None = None
) -> tuple[list[str], dict[str, int]]:
    """N paraphrases of a task's (single) instruction, sampled from the base model (on `engine`, default the
    transformers one), and the count of rejected samples by reason."""
    from specialize.generation import SamplingParams, prompt_requests
    from specialize.generation.engines import HFEngine

    engine = engine or HFEngine(rt.model, rt.tokenizer, rt.precision)

    instructions = {e.instruction for e in task.examples}
    if len(instructions) != 1:
        raise ConfigError(
            f"task {task.name}: generate_paraphrases needs one shared instruction, found {len(instructions)}"
        )
    [instruction] = instructions
    template = rt.prompt_template()
    prompt = template.render(PARAPHRASE_PROMPT.format(instruction=instruction))
    out: list[str] = []
    rejected: Counter[str] = Counter()
    for i in range(task.spec.generate_paraphrases * 5):  # resample unusable rewrites, within a bound
        params = SamplingParams(max_new_tokens=128, temperature=0.8, top_p=0.95, seed=seed + i, stop=("\n\n",))
        [c] = engine.run(prompt_requests(rt.tokenizer, [prompt], template, params))
        text = c.text.strip()
        problem = paraphrase_problem(text, instruction, out) if c.finish_reason != "length" else "cut off"
        if problem:
            rejected[problem] += 1
            continue
        out.append(text)
        if len(out) == task.spec.generate_paraphrases:
            return out, dict(rejected)
    raise RuntimeError(
        f"task {task.name}: the model wrote only {len(out)} usable paraphrases in {i + 1} samples "
        f"(rejected: {dict(rejected)})"
    )


def _model_names(cfg: EvalConfig) -> list[str]:
    return ([BASE] if cfg.include_base else []) + list(cfg.adapters)


@contextlib.contextmanager
def _as_model(rt: models.Runtime, name: str) -> Iterator[None]:
    """`rt.model` acts as the base model or as one adapter inside the block."""
    if not rt.adapter_templates:
        yield
    elif name == BASE:
        with rt.model.disable_adapter():
            yield
    else:
        rt.model.set_adapter(name)
        yield


def _fingerprint(cfg: EvalConfig) -> str:
    """What determines the predictions: settings, model identity and adapter weights (not where they go)."""
    return fingerprint({
        "config": {**cfg.model_dump(mode="json", exclude={"output_dir"}), "model": cfg.model.hashed()},
        "model": models.model_identity(cfg.model.spec),
        "adapters": {n: file_sha256(Path(p) / models.ADAPTER_WEIGHTS) for n, p in cfg.adapters.items()},
    })  # fmt: skip


PARTIAL = "predictions.partial.jsonl"


def _resume(path: Path, fp: str) -> dict[tuple, list[Prediction]]:
    """Finished units of an interrupted run of the same evaluation: (model, task, k, variant) -> rows. A unit
    counts once its end marker is on disk; a log of another evaluation is discarded."""
    log = read_log(path)
    if not log or log[0].get("fingerprint") != fp:
        if log:
            print(f"{path}: from a different evaluation; starting over")
        path.unlink(missing_ok=True)
        append_log(path, {"fingerprint": fp})
        return {}
    rows: dict[tuple, list[Prediction]] = defaultdict(list)
    done: dict[tuple, list[Prediction]] = {}
    for rec in log[1:]:
        if "unit_done" in rec:
            key = tuple(rec["unit_done"])
            done[key] = rows.pop(key, [])
        else:
            p = Prediction.model_validate(rec)
            rows[p.unit].append(p)
    return done


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> Summary:
    start = time.perf_counter()
    tasks, splits = prepare(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    finished = _resume(out / PARTIAL, _fingerprint(cfg))
    rt = models.load_runtime(cfg.model, template=cfg.template)
    generated: dict[str, list[str]] = {}
    rejected: dict[str, dict[str, int]] = {}
    # paraphrases are written once by the base model and shared by every evaluated model; they are seeded, so
    # a resumed run writes the same ones
    for task in tasks:
        if task.spec.generate_paraphrases:
            generated[task.name], rejected[task.name] = generate_paraphrases(
                rt, task, cfg.seed, engine_for(rt, cfg.model)
            )
            task.spec = task.spec.model_copy(update={"paraphrases": task.spec.paraphrases + generated[task.name]})
    if cfg.adapters:
        rt.attach(cfg.adapters, cfg.template)
    engine = engine_for(rt, cfg.model, batch_size=cfg.batch_size)
    units = list(_units(tasks, cfg.shots))
    names = _model_names(cfg)
    rows: list[Prediction] = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        todo = sum((n, t.name, k, v) not in finished for n in names for t, k, v, _ in units)
        job = bar.add_task("evaluating", total=todo)
        for model_name in names:
            for task, k, variant, instruction in units:
                key = (model_name, task.name, k, variant)
                if key in finished:
                    rows += finished[key]
                    continue
                bar.update(job, description=f"{model_name} / {task.name} / k={k} / {variant}")
                examples = [with_demos(with_instruction(e, instruction), task.demos, k, cfg.seed, task.fallback_demos)
                            for e in task.examples]  # fmt: skip
                with _as_model(rt, model_name):
                    prompts, preds = _predict(rt, engine, model_name, task, examples, cfg.batch_size)
                unit = [_row(model_name, task, k, variant, ex, prompt, pred)
                        for ex, prompt, pred in zip(examples, prompts, preds, strict=True)]  # fmt: skip
                append_log(out / PARTIAL, *(p.model_dump(exclude_none=True) for p in unit), {"unit_done": list(key)})
                rows += unit
                bar.advance(job)
    summary = summarize(rows, tasks, splits, cfg)
    summary.instructions = {t.name: t.spec.paraphrases for t in tasks if t.spec.paraphrases}
    summary.generated_paraphrases = generated
    summary.paraphrases_rejected = rejected
    summary.templates = {n: rt.template_for(n) for n in names}
    summary.seconds = time.perf_counter() - start
    with atomic_path(out / "predictions.jsonl") as tmp, tmp.open("w") as f:
        for r in rows:
            f.write(r.line() + "\n")
    atomic_write_text(out / "summary.json", summary.json_text())
    atomic_write_text(out / "manifest.json", json.dumps(manifest(cfg, rt, tasks), indent=1))
    (out / PARTIAL).unlink()
    return summary


def _row(
    model: str, task: LoadedTask, k: int, variant: str, ex: Example, prompt: str, pred: dict[str, Any]
) -> Prediction:
    return Prediction(model=model, task=task.name, k=k, variant=variant, id=ex.id,
                      prompt_hash=text_sha256(prompt, 16), **pred, references=list(ex.references),
                      scores=_score(task, ex, pred), demo_ids=ex.metadata.get("demo_ids", []),
                      fallback_demo_ids=ex.metadata.get("fallback_demo_ids"))  # fmt: skip


def summarize(rows: list[Prediction], tasks: list[LoadedTask], splits: dict[str, str], cfg: EvalConfig) -> Summary:
    groups: dict[tuple, list[Prediction]] = defaultdict(list)
    for r in rows:
        groups[r.unit].append(r)
    majority = {t.name: _majority_baseline(t) for t in tasks if t.spec.protocol == "options"}
    primary = {t.name: t.spec.primary_metric for t in tasks}
    scores = []
    for (model, task, k, variant), rs in groups.items():
        metrics = {}
        for metric in rs[0].scores:
            est = bootstrap_ci([r.scores[metric] for r in rs], resamples=cfg.bootstrap_resamples, seed=cfg.seed)
            metrics[metric] = Estimate(mean=est.mean, ci95=(est.low, est.high))
        entry = ScoreEntry(model=model, task=task, k=k, variant=variant, n=len(rs), metrics=metrics,
                           split=splits.get(task, "train" if splits else "all"), primary=primary[task])  # fmt: skip
        if task in majority and "accuracy" in metrics:
            entry.majority_baseline = majority[task]
            entry.above_majority = metrics["accuracy"].mean > majority[task]
        scores.append(entry)
    summary = Summary(scores=scores)
    by_mt: dict[tuple, list[ScoreEntry]] = defaultdict(list)
    for s in scores:
        by_mt[(s.model, s.task)].append(s)
    for (model, task), ss in by_mt.items():
        metric = primary[task]
        originals = {s.k: s.metrics[metric].mean for s in ss if s.variant == "original"}
        if len(originals) > 1:  # Self-Specialization Table 4: worst / average / best over k
            vals = list(originals.values())
            summary.kshot.append(KShot(model=model, task=task, metric=metric, by_k=originals, worst=min(vals),
                                       average=statistics.mean(vals), best=max(vals)))  # fmt: skip
        for k in originals:
            variants = [s.metrics[metric].mean for s in ss if s.k == k]
            if len(variants) > 1:  # robustness to paraphrased instructions (Shi et al. Figure 4)
                summary.paraphrase.append(Robustness(
                    model=model, task=task, k=k, metric=metric, n_instructions=len(variants),
                    mean=statistics.mean(variants), best=max(variants), worst=min(variants),
                    spread=max(variants) - min(variants), stdev=statistics.pstdev(variants)))  # fmt: skip
    if splits:
        agg: dict[tuple, list[float]] = defaultdict(list)
        for s in scores:
            if s.variant == "original":
                agg[(s.model, s.k, s.split)].append(s.metrics[primary[s.task]].mean)
        summary.splits = [SplitMean(model=m, k=k, split=sp, tasks=len(v), mean=statistics.mean(v))
                          for (m, k, sp), v in sorted(agg.items())]  # fmt: skip
    if cfg.include_base:
        summary.comparisons = _paired(rows, primary, cfg)
    return summary


def _majority_baseline(task: LoadedTask) -> float:
    """Accuracy of always answering the most frequent label of the evaluated examples."""
    counts: dict[str, int] = defaultdict(int)
    for e in task.examples:
        counts[e.output] += 1
    return 100.0 * max(counts.values()) / len(task.examples)


def _paired(rows: list[Prediction], primary: dict[str, str], cfg: EvalConfig) -> list[Comparison]:
    keyed: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        keyed[(r.task, r.k, r.variant, r.model)][r.id] = r.scores[primary[r.task]]
    out = []
    for (task, k, variant, model), sc in keyed.items():
        if model == BASE:
            continue
        base = keyed[(task, k, variant, BASE)]
        ids = sorted(sc)
        cmp = paired_bootstrap(
            [sc[i] for i in ids], [base[i] for i in ids], resamples=cfg.bootstrap_resamples, seed=cfg.seed
        )
        out.append(Comparison(model=model, vs=BASE, task=task, k=k, variant=variant, metric=primary[task],
                              difference=cmp.difference.mean, ci95=(cmp.difference.low, cmp.difference.high),
                              p_value=cmp.p_value))  # fmt: skip
    return out


def manifest(cfg: EvalConfig, rt: models.Runtime, tasks: list[LoadedTask]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import specialize

    return {
        "model": models.describe(cfg.model.spec),
        "adapters": {
            n: {"path": p, "sha256": file_sha256(Path(p) / models.ADAPTER_WEIGHTS)[:16], "template": rt.template_for(n)}
            for n, p in cfg.adapters.items()
        },
        "template": rt.template,
        "precision": rt.precision.describe(),
        "tokenizer": {"name": getattr(rt.tokenizer, "name_or_path", ""), "vocab_size": len(rt.tokenizer)},
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "versions": {
            "specialize": specialize.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "data": {
            t.name: {
                "n": len(t.examples),
                "ids_sha256": lines_sha256(e.id for e in t.examples),
                **({"group_left_out": t.metadata["left_out"]} if "left_out" in t.metadata else {}),
            }
            for t in tasks
        },
    }


# A rich table needs this many columns; on a narrower console (a log file, CI, an 80-column window) it would cut
# task names and wrap every CI, so the summary prints one line per score instead.
WIDE_TABLE = 140


def _score_lines(summary: Summary) -> Iterator[tuple[ScoreEntry, str, str, str]]:
    """(score entry, metric, "mean [low, high]", majority note) for every score of the summary."""
    for s in summary.scores:
        for metric, val in s.metrics.items():
            majority = ""
            if metric == "accuracy" and s.majority_baseline is not None:
                verdict = "above" if s.above_majority else "NOT above"
                majority = f"{s.majority_baseline:.2f} ({verdict})"
            yield s, metric, f"{val.mean:.2f} [{val.ci95[0]:.2f}, {val.ci95[1]:.2f}]", majority


def print_summary(summary: Summary, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()

    def say(text: str) -> None:  # one whole line, however narrow the console (a log file, CI, 80 columns)
        console.print(text, soft_wrap=True, markup=False, highlight=False)

    if console.is_terminal and console.width >= WIDE_TABLE:
        table = Table(title="scores (mean [95% bootstrap CI])")
        for col in ("model", "task", "k", "variant", "split", "n", "metric", "score", "majority"):
            table.add_column(col)
        for s, metric, score, majority in _score_lines(summary):
            table.add_row(s.model, s.task, str(s.k), s.variant, s.split, str(s.n), metric, score, majority)
        console.print(table)
    else:
        say("scores: model task k variant split n metric mean [95% bootstrap CI]")
        for s, metric, score, majority in _score_lines(summary):
            say(f"{s.model} {s.task} k={s.k} {s.variant} {s.split} n={s.n} {metric} {score}"
                + (f" majority {majority}" if majority else ""))  # fmt: skip
    for s in summary.scores:
        if s.majority_baseline is not None:
            verdict = "above" if s.above_majority else "NOT above"
            say(f"{s.model} {s.task} k={s.k} {s.variant}: accuracy {s.metrics['accuracy'].mean:.2f} "
                f"is {verdict} the majority-class baseline {s.majority_baseline:.2f}")  # fmt: skip
    for r in summary.kshot:
        say(f"{r.model} {r.task} {r.metric} over k: worst {r.worst:.2f}, average {r.average:.2f}, best {r.best:.2f}")
    for p in summary.paraphrase:
        say(f"{p.model} {p.task} k={p.k} over {p.n_instructions} instructions: mean {p.mean:.2f}, "
            f"best {p.best:.2f}, worst {p.worst:.2f}, spread {p.spread:.2f}")  # fmt: skip
    for sp in summary.splits:
        say(f"{sp.model} k={sp.k} {sp.split} tasks ({sp.tasks}): mean {sp.mean:.2f}")
    for c in summary.comparisons:
        say(f"{c.model} - base on {c.task} (k={c.k}, {c.variant}): {c.difference:+.2f} "
            f"[{c.ci95[0]:+.2f}, {c.ci95[1]:+.2f}], p={c.p_value:.3f}")  # fmt: skip
