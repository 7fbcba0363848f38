"""The evaluation harness: models (base and adapters) x tasks x k-shot x instruction variants.

    specialize eval CONFIG.yaml            # or: specialize eval --task fpb --adapter biomed=runs/x/adapter

Writes results/<run>/predictions.jsonl (one line per model/task/k/variant/example), summary.json (every
score with its bootstrap 95% CI, k-shot worst/average/best, paraphrase spread, held-out vs train, paired
comparisons of each adapter against the base) and manifest.json, then prints a table.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specialize import models
from specialize.config import ConfigError, ModelConfig
from specialize.data import Example
from specialize.eval.metrics import METRICS
from specialize.eval.options import score_options
from specialize.eval.stats import bootstrap_ci, paired_bootstrap
from specialize.eval.tasks import LoadedTask, load_task_spec, load_tasks, read_split_file, with_demos, with_instruction
from specialize.io import atomic_path, atomic_write_text
from specialize.prompts import encode_prompt, get_template, render_prompt


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> PEFT adapter directory")
    include_base: bool = True
    tasks: list[str | dict[str, Any]] = Field(min_length=1)
    data_root: str = "../shared/data"
    shots: list[int] | None = Field(None, description="overrides every task's shots")
    limit: int | None = Field(None, ge=1, description="overrides every task's limit")
    template: Literal["alpaca", "chat"] = "alpaca"
    split_file: str | None = None
    output_dir: str = "results/eval"
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    bootstrap_resamples: int = Field(1000, ge=100)


def _prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return models.file_sha256(path)[:16] if path.is_file() else ""


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
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter {name!r}: {path} has no adapter_config.json")
    if not cfg.include_base and not cfg.adapters:
        raise ConfigError("nothing to evaluate: include_base is false and no adapters are given")
    overrides = {"limit": cfg.limit} if cfg.limit is not None else None
    tasks = [t for ref in cfg.tasks for t in load_tasks(load_task_spec(ref, cfg.data_root, overrides), cfg.seed)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    for task, k, _, _ in _units(tasks, cfg.shots):
        if k and len(task.demos) <= k:
            raise ConfigError(f"task {task.name}: {len(task.demos)} demonstrations cannot give k={k}")
    splits = read_split_file(cfg.split_file) if cfg.split_file else {}
    return tasks, splits


def _predict(model, tokenizer, template, task: LoadedTask, examples: list[Example], batch_size: int):
    """Predictions and per-option scores for prepared examples (demos and instruction already applied)."""
    prompts = [render_prompt(e, template) for e in examples]
    if task.spec.protocol == "options":
        options = [list(task.options or e.options or ()) for e in examples]
        ids = [encode_prompt(p, template, tokenizer) for p in prompts]
        scored = score_options(model, tokenizer, ids, options, batch_size=batch_size)
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
    from specialize.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=task.spec.max_new_tokens, stop=tuple(task.spec.stop))
    outs = generate(model, tokenizer, prompts, template, params, batch_size=batch_size)
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
    model: Any, tokenizer: Any, template: Any, task: LoadedTask, seed: int
) -> tuple[list[str], dict[str, int]]:
    """N paraphrases of a task's (single) instruction, sampled from the model with the generation backend, and
    the count of rejected samples by reason."""
    from specialize.generation import SamplingParams, generate

    instructions = {e.instruction for e in task.examples}
    if len(instructions) != 1:
        raise ConfigError(
            f"task {task.name}: generate_paraphrases needs one shared instruction, found {len(instructions)}"
        )
    [instruction] = instructions
    prompt = template.render(PARAPHRASE_PROMPT.format(instruction=instruction))
    out: list[str] = []
    rejected: Counter[str] = Counter()
    for i in range(task.spec.generate_paraphrases * 5):  # resample unusable rewrites, within a bound
        params = SamplingParams(max_new_tokens=128, temperature=0.8, top_p=0.95, seed=seed + i, stop=("\n\n",))
        [c] = generate(model, tokenizer, [prompt], template, params)
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


def _model_variants(cfg: EvalConfig, base: Any) -> Iterator[tuple[str, Any]]:
    if cfg.include_base:
        yield "base", base
    if not cfg.adapters:
        return
    from peft import PeftModel

    names = list(cfg.adapters)
    model = PeftModel.from_pretrained(base, cfg.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(cfg.adapters[name], adapter_name=name)
    for name in names:
        model.set_adapter(name)
        yield name, model


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    tasks, splits = prepare(cfg)
    m = cfg.model
    base, tokenizer = models.load_model(
        m.spec,
        dtype=m.dtype,
        device=m.device,
        threads=m.threads,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
    )
    template = get_template(cfg.template, tokenizer)
    generated: dict[str, list[str]] = {}
    rejected: dict[str, dict[str, int]] = {}
    for task in tasks:  # written once by the base model, then shared by every evaluated model
        if task.spec.generate_paraphrases:
            generated[task.name], rejected[task.name] = generate_paraphrases(base, tokenizer, template, task, cfg.seed)
            task.spec = task.spec.model_copy(update={"paraphrases": task.spec.paraphrases + generated[task.name]})
    units = list(_units(tasks, cfg.shots))
    n_models = int(cfg.include_base) + len(cfg.adapters)
    rows: list[dict[str, Any]] = []
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        job = bar.add_task("evaluating", total=n_models * len(units))
        for model_name, model in _model_variants(cfg, base):
            for task, k, variant, instruction in units:
                bar.update(job, description=f"{model_name} / {task.name} / k={k} / {variant}")
                examples = [
                    with_demos(with_instruction(e, instruction), task.demos, k, cfg.seed) for e in task.examples
                ]
                prompts, preds = _predict(model, tokenizer, template, task, examples, cfg.batch_size)
                for ex, prompt, pred in zip(examples, prompts, preds, strict=True):
                    rows.append(
                        {
                            "model": model_name,
                            "task": task.name,
                            "k": k,
                            "variant": variant,
                            "id": ex.id,
                            "prompt_hash": _prompt_hash(prompt),
                            **pred,
                            "references": list(ex.references),
                            "scores": _score(task, ex, pred),
                            "demo_ids": ex.metadata.get("demo_ids", []),
                        }
                    )
                bar.advance(job)
    summary = summarize(rows, tasks, splits, cfg)
    summary["instructions"] = {t.name: t.spec.paraphrases for t in tasks if t.spec.paraphrases}
    summary["generated_paraphrases"] = generated
    summary["paraphrases_rejected"] = rejected
    summary["seconds"] = time.perf_counter() - start  # the cost of this evaluation, kept with its cached results
    out = Path(cfg.output_dir)
    with atomic_path(out / "predictions.jsonl") as tmp, tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "manifest.json", json.dumps(manifest(cfg, tokenizer, tasks), indent=1))
    return summary


def summarize(rows: list[dict[str, Any]], tasks: list[LoadedTask], splits: dict[str, str], cfg: EvalConfig) -> dict:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["task"], r["k"], r["variant"])].append(r)
    scores = []
    for (model, task, k, variant), rs in groups.items():
        entry: dict[str, Any] = {
            "model": model,
            "task": task,
            "k": k,
            "variant": variant,
            "n": len(rs),
            "split": splits.get(task, "train" if splits else "all"),
        }
        for metric in rs[0]["scores"]:
            est = bootstrap_ci([r["scores"][metric] for r in rs], resamples=cfg.bootstrap_resamples, seed=cfg.seed)
            entry[metric] = {"mean": est.mean, "ci95": [est.low, est.high]}
        scores.append(entry)
    majority = {t.name: _majority_baseline(t) for t in tasks if t.spec.protocol == "options"}
    for entry in scores:
        if entry["task"] in majority and "accuracy" in entry:
            entry["majority_baseline"] = majority[entry["task"]]
            entry["above_majority"] = entry["accuracy"]["mean"] > majority[entry["task"]]
    summary: dict[str, Any] = {"scores": scores, "kshot": [], "paraphrase": [], "splits": [], "comparisons": []}
    primary = {t.name: t.spec.metric_names[0] for t in tasks}
    by_mt: dict[tuple, list[dict]] = defaultdict(list)
    for s in scores:
        by_mt[(s["model"], s["task"])].append(s)
    for (model, task), ss in by_mt.items():
        metric = primary[task]
        originals = {s["k"]: s[metric]["mean"] for s in ss if s["variant"] == "original"}
        if len(originals) > 1:  # Self-Specialization Table 4: worst / average / best over k
            vals = list(originals.values())
            summary["kshot"].append(
                {
                    "model": model,
                    "task": task,
                    "metric": metric,
                    "by_k": originals,
                    "worst": min(vals),
                    "average": statistics.mean(vals),
                    "best": max(vals),
                }
            )
        for k in originals:
            variants = [s[metric]["mean"] for s in ss if s["k"] == k]
            if len(variants) > 1:  # robustness to paraphrased instructions (Shi et al. Figure 4)
                summary["paraphrase"].append(
                    {
                        "model": model,
                        "task": task,
                        "k": k,
                        "metric": metric,
                        "n_instructions": len(variants),
                        "mean": statistics.mean(variants),
                        "best": max(variants),
                        "worst": min(variants),
                        "spread": max(variants) - min(variants),
                        "stdev": statistics.pstdev(variants),
                    }
                )
    if splits:
        agg: dict[tuple, list[float]] = defaultdict(list)
        for s in scores:
            if s["variant"] == "original":
                agg[(s["model"], s["k"], s["split"])].append(s[primary[s["task"]]]["mean"])
        summary["splits"] = [
            {"model": m, "k": k, "split": sp, "tasks": len(v), "mean": statistics.mean(v)}
            for (m, k, sp), v in sorted(agg.items())
        ]
    if cfg.include_base:
        summary["comparisons"] = _paired(rows, primary, cfg)
    return summary


def _majority_baseline(task: LoadedTask) -> float:
    """Accuracy of always answering the most frequent label of the evaluated examples."""
    counts: dict[str, int] = defaultdict(int)
    for e in task.examples:
        counts[e.output] += 1
    return 100.0 * max(counts.values()) / len(task.examples)


def _paired(rows: list[dict], primary: dict[str, str], cfg: EvalConfig) -> list[dict]:
    keyed: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        keyed[(r["task"], r["k"], r["variant"], r["model"])][r["id"]] = r["scores"][primary[r["task"]]]
    out = []
    for (task, k, variant, model), sc in keyed.items():
        if model == "base":
            continue
        base = keyed[(task, k, variant, "base")]
        ids = sorted(sc)
        cmp = paired_bootstrap(
            [sc[i] for i in ids], [base[i] for i in ids], resamples=cfg.bootstrap_resamples, seed=cfg.seed
        )
        out.append(
            {
                "model": model,
                "vs": "base",
                "task": task,
                "k": k,
                "variant": variant,
                "metric": primary[task],
                "difference": cmp.difference.mean,
                "ci95": [cmp.difference.low, cmp.difference.high],
                "p_value": cmp.p_value,
            }
        )
    return out


def manifest(cfg: EvalConfig, tokenizer: Any, tasks: list[LoadedTask]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import specialize

    return {
        "model": models.describe(cfg.model.spec),
        "adapters": {
            n: {"path": p, "sha256": _file_hash(Path(p) / "adapter_model.safetensors")} for n, p in cfg.adapters.items()
        },
        "template": cfg.template,
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer)},
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
                "ids_sha256": hashlib.sha256("\n".join(e.id for e in t.examples).encode()).hexdigest(),
                **({"group_left_out": t.metadata["left_out"]} if "left_out" in t.metadata else {}),
            }
            for t in tasks
        },
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scores (mean [95% bootstrap CI])")
    for col in ("model", "task", "k", "variant", "split", "n", "metric", "score", "majority"):
        table.add_column(col)
    for s in summary["scores"]:
        for metric, val in s.items():
            if isinstance(val, dict) and "mean" in val:
                score = f"{val['mean']:.2f} [{val['ci95'][0]:.2f}, {val['ci95'][1]:.2f}]"
                majority = ""
                if metric == "accuracy" and "majority_baseline" in s:
                    verdict = "above" if s["above_majority"] else "NOT above"
                    majority = f"{s['majority_baseline']:.2f} ({verdict})"
                row = (s["model"], s["task"], str(s["k"]), s["variant"], s["split"], str(s["n"]), metric, score)
                table.add_row(*row, majority)
    console = Console(soft_wrap=True)  # result lines stay whole when piped
    console.print(table)
    for s in summary["scores"]:
        if "majority_baseline" in s:
            verdict = "above" if s["above_majority"] else "NOT above"
            console.print(
                f"{s['model']} {s['task']} k={s['k']} {s['variant']}: accuracy {s['accuracy']['mean']:.2f} "
                f"is {verdict} the majority-class baseline {s['majority_baseline']:.2f}"
            )
    for row in summary["kshot"]:
        console.print(
            f"{row['model']} {row['task']} {row['metric']} over k: worst {row['worst']:.2f}, "
            f"average {row['average']:.2f}, best {row['best']:.2f}"
        )
    for row in summary["paraphrase"]:
        console.print(
            f"{row['model']} {row['task']} k={row['k']} over {row['n_instructions']} instructions: "
            f"mean {row['mean']:.2f}, best {row['best']:.2f}, worst {row['worst']:.2f}, "
            f"spread {row['spread']:.2f}"
        )
    for row in summary["splits"]:
        console.print(f"{row['model']} k={row['k']} {row['split']} tasks ({row['tasks']}): mean {row['mean']:.2f}")
    for row in summary["comparisons"]:
        console.print(
            f"{row['model']} - base on {row['task']} (k={row['k']}, {row['variant']}): "
            f"{row['difference']:+.2f} [{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}], p={row['p_value']:.3f}"
        )
