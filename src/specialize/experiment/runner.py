"""`specialize run EXPERIMENT.yaml`: expand the grid, then for every run train (two stages) and evaluate,
computing only what is new.

Caching is by content: training stages live in `<cache>/train/stages/<name>-<hash>` (a stage keyed by model,
method, settings, data ids, seed and parent stage), so the generalist stage is trained once and shared by
every specialist amount; evaluations live in `<cache>/eval/<hash>` keyed by the eval settings and the
evaluated weights' sha256. `<cache>` is the experiment's `cache_dir` (default: its output_dir); experiments
that name the same one share stages, e.g. the presets' common LIMA stage is trained once for all of
them. A finished artifact is never recomputed; a crash leaves unfinished stages to resume from their
checkpoints. Every run's config, scores (with CIs) and timings go to `<out>/results.sqlite`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specialize import models
from specialize.config import BASE
from specialize.eval.results import ScoreEntry, Summary
from specialize.experiment.config import ExperimentConfig, RunSpec, expand
from specialize.hashing import fingerprint, weights_sha256
from specialize.train.config import StageConfig, TrainConfig, self_specialization_config

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, model TEXT, generalist TEXT, amount INTEGER, seed INTEGER,
    weights TEXT, eval_dir TEXT, config TEXT, train_s REAL, eval_s REAL, finished REAL);
CREATE TABLE IF NOT EXISTS scores (
    run_id TEXT, task TEXT, k INTEGER, variant TEXT, split TEXT, metric TEXT, mean REAL, ci_low REAL,
    ci_high REAL, n INTEGER, PRIMARY KEY (run_id, task, k, variant, metric));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
PRIMARY_META = "primary_metrics"  # meta key: task -> the metric its evaluation declared primary
BASE_RUN = BASE  # the run id of the base model's evaluation
RUN = "run"  # the name an evaluated adapter takes inside its evaluation


def evaluation_ids(cfg: ExperimentConfig) -> list[str]:
    """Ids of every instance the experiment evaluates on: specialist mixes never train on them (SuperNI tasks
    are both the task data and the test set, as in Shi et al.'s in-task evaluation)."""
    from specialize.eval.harness import prepare

    tasks, _ = prepare(eval_config(cfg, 0, None)[0])
    return sorted({e.id for t in tasks for e in t.examples})


def train_config(cfg: ExperimentConfig, run: RunSpec, exclude: list[str] | None = None) -> TrainConfig:
    """The run's training: an optional generalist stage, then the specialist stage on the run's amount, drawn
    from everything but `exclude` (the evaluation instances)."""
    stages = []
    if run.generalist is not None:
        stages.append(StageConfig(name="generalist", sources=run.generalist.sources,
                                  **cfg.generalist_stage.model_dump()))  # fmt: skip
    if run.amount > 0:
        # the specialist amount is split over the sources (each source then splits over its tasks)
        share = [run.amount // len(cfg.specialist) + (i < run.amount % len(cfg.specialist))
                 for i in range(len(cfg.specialist))]  # fmt: skip
        sources = [s.model_copy(update={"amount": n, "exclude_ids": exclude or None})
                   for s, n in zip(cfg.specialist, share, strict=True) if n]  # fmt: skip
        stages.append(StageConfig(name="specialist", sources=sources, **cfg.specialist_stage.model_dump()))
    return TrainConfig(model=cfg.models[run.model_index], method=cfg.method, lora=cfg.lora, template=cfg.template,
                       stages=stages, seed=run.seed, output_dir=str(cfg.cache / "train"),
                       save_every=cfg.save_every, progress=True)  # fmt: skip


class Store:
    """The experiment's results: one SQLite file, written in small transactions (a crash loses nothing done)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.executescript(SCHEMA)

    def done(self, run_id: str, eval_dir: str) -> bool:
        row = self.db.execute("SELECT eval_dir FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None and row[0] == eval_dir

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        self.db.execute(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in row)})", row)

    def record(self, run_id: str, info: dict[str, Any], scores: list[ScoreEntry]) -> None:
        with self.db:
            self.db.execute("DELETE FROM scores WHERE run_id = ?", (run_id,))
            self._insert("runs", {
                "run_id": run_id, "model": info["model"], "generalist": info["generalist"], "amount": info["amount"],
                "seed": info["seed"], "weights": info["weights"], "eval_dir": info["eval_dir"],
                "config": json.dumps(info["config"]), "train_s": info["train_s"], "eval_s": info["eval_s"],
                "finished": time.time()})  # fmt: skip
            for s in scores:
                for metric, v in s.metrics.items():
                    self._insert("scores", {
                        "run_id": run_id, "task": s.task, "k": s.k, "variant": s.variant, "split": s.split,
                        "metric": metric, "mean": v.mean, "ci_low": v.ci95[0], "ci_high": v.ci95[1],
                        "n": s.n})  # fmt: skip
            declared = {s.task: s.primary for s in scores if s.primary}
            if declared:
                row = self.db.execute("SELECT value FROM meta WHERE key = ?", (PRIMARY_META,)).fetchone()
                merged = {**(json.loads(row[0]) if row else {}), **declared}
                self._insert("meta", {"key": PRIMARY_META, "value": json.dumps(merged)})

    def read(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """(runs by id, scores, meta), every row a dict keyed by its column names."""
        self.db.row_factory = sqlite3.Row
        try:
            runs = {r["run_id"]: dict(r) for r in self.db.execute("SELECT * FROM runs")}
            scores = [dict(r) for r in self.db.execute("SELECT * FROM scores")]
            meta = {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT key, value FROM meta")}
        finally:
            self.db.row_factory = None
        return runs, scores, meta

    def set_meta(self, key: str, value: Any) -> None:
        with self.db:
            self._insert("meta", {"key": key, "value": json.dumps(value)})


def is_adapter(weights: str | Path | None) -> bool:
    """Whether a run's weights are a PEFT adapter (evaluated as "run" on the base) rather than a full model."""
    return weights is not None and (Path(weights) / "adapter_config.json").is_file()


def eval_config(cfg: ExperimentConfig, model_index: int, weights: Path | None, shots: list[int] | None = None):
    """The evaluation of one set of weights (None = the base model), at `shots` (default: eval.shots), and its
    cache directory."""
    from specialize.eval.harness import EvalConfig

    model = cfg.models[model_index]
    e = cfg.eval if shots is None else cfg.eval.model_copy(update={"shots": shots})
    key = {"eval": e.model_dump(mode="json"), "template": cfg.template, "data_root": cfg.data_root,
           "model": models.model_identity(model.spec),
           "weights": weights_sha256(weights) if weights else None}  # fmt: skip
    eval_dir = cfg.cache / "eval" / fingerprint(key)
    adapter = is_adapter(weights)
    if weights is not None and not adapter:  # full fine-tuning: the stage's weights are the model
        model = model.model_copy(update={"spec": str(weights)})
    ec = EvalConfig(**e.model_dump(), model=model, adapters={RUN: str(weights)} if adapter else {},
                    include_base=not adapter, data_root=cfg.data_root, template=cfg.template,
                    output_dir=str(eval_dir))  # fmt: skip
    return ec, eval_dir


def _train(tc: TrainConfig) -> tuple[Path, float]:
    """The run's final weights and the training seconds behind them: the steps of all its stages, as each
    stage's metrics.jsonl recorded them, so a run resumed or read from the cache reports the same cost."""
    from specialize.train import run_training

    results = run_training(tc)
    seconds = sum(json.loads(line)["step_s"] for r in results
                  for line in (Path(r.dir) / "metrics.jsonl").read_text().splitlines())  # fmt: skip
    return Path(results[-1].output), seconds


def _evaluate_into(store: Store, run_id: str, ec, eval_dir: Path, info: dict[str, Any]) -> None:
    """Evaluate (or read the cached evaluation) and record the run's scores, unless the store has them."""
    from specialize.eval.harness import evaluate

    # absolute paths: `specialize report` may run from another directory than the experiment did
    eval_dir = eval_dir.resolve()
    info = {**info, "weights": str(Path(info["weights"]).resolve()) if info["weights"] else None}
    if store.done(run_id, str(eval_dir)):
        return
    summary = Summary.read(eval_dir / "summary.json") if (eval_dir / "summary.json").is_file() else evaluate(ec)
    evaluated = RUN if ec.adapters else BASE  # full fine-tuning evaluates the tuned weights as the model
    scores = [s for s in summary.scores if s.model == evaluated]
    # seconds is None when the evaluation was cached by a version that did not record it
    store.record(run_id, {**info, "eval_dir": str(eval_dir), "eval_s": summary.seconds}, scores)


def plan(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """What a run would do: per grid point, its stages (cached or to train, with example counts)."""
    from specialize.train.sft import planned_stage_dirs, prepare_stages

    rows, exclude = [], evaluation_ids(cfg)
    for run in expand(cfg):
        tc = train_config(cfg, run, exclude)
        prepared = prepare_stages(tc)
        stages = []
        for prep, sdir in zip(prepared, planned_stage_dirs(tc, prepared), strict=True):
            stages.append({"stage": prep.config.name, "examples": len(prep.examples), "epochs": prep.config.epochs,
                           "cached": (sdir / "result.json").is_file(), "dir": str(sdir),
                           "chars": sum(len(e.instruction) + len(e.input) + len(e.output)
                                        for e in prep.examples)})  # fmt: skip
        rows.append({"run": run.run_id(cfg), "stages": stages})
    return rows


def print_plan(cfg: ExperimentConfig, rows: list[dict[str, Any]], train_tok_s: float) -> None:
    total_s = 0.0
    seen: set[str] = set()
    names = [t if isinstance(t, str) else t.get("name", "?") for t in cfg.eval.tasks]
    print(f"experiment {cfg.name}: {len(rows)} trained runs + base; eval tasks: {', '.join(names)}")
    for r in rows:
        parts = []
        for s in r["stages"]:
            new = not s["cached"] and s["dir"] not in seen
            seen.add(s["dir"])
            cost = s["chars"] / 4 * s["epochs"] / train_tok_s  # ~4 characters per token
            total_s += cost if new else 0.0
            state = f"~{cost / 60:.1f} min" if new else ("cached" if s["cached"] else "shared")
            parts.append(f"{s['stage']} ({s['examples']} ex x {s['epochs']} ep, {state})")
        print(f"  {r['run']:28s} " + " -> ".join(parts))
    print(f"estimated training time: ~{total_s / 60:.1f} min at {train_tok_s:.0f} tokens/s (plus evaluation)")


SELF_SPEC = "self-spec"  # the `generalist` of every self-specialized run in the results store


def _synth(cfg: ExperimentConfig, out: Path, name: str | None, **fields: Any) -> Path:
    """One synth run of the experiment (`name` None: the single-variant layout, `<out>/synth`); its data.jsonl.
    Named variants keep their instruction stages in the cache, where variants differing only in how responses
    are made find and share one."""
    from specialize.synth.pipeline import SynthConfig, run_synth

    where = {"output_dir": str(out / "synth")} if name is None else {
        "output_dir": str(out / "synth" / name), "instructions_root": str(cfg.cache / "synth")}  # fmt: skip
    sc = SynthConfig.model_validate({"model": cfg.models[0].model_dump(), **cfg.synth, **where, **fields})
    return run_synth(sc)


def _self_specialize(
    cfg: ExperimentConfig, store: Store, data: Path, run_id: str, shots: list[int] | None = None
) -> Path:
    """Tune a LoRA specialist on synthetic data (Kang et al.'s 'self-specialized' model) and evaluate it (at
    `shots`, default eval.shots); returns the adapter."""
    from specialize.data import read_records

    n = len(read_records(data).records)
    tc = self_specialization_config(
        data, model=cfg.models[0], output_dir=cfg.cache / "train", stage=cfg.synth_stage, method=cfg.method,
        lora=cfg.lora, template=cfg.template, seed=cfg.seeds[0], save_every=cfg.save_every,
    )  # fmt: skip
    weights, train_s = _train(tc)
    ec, eval_dir = eval_config(cfg, 0, weights, shots)
    _evaluate_into(store, run_id, ec, eval_dir, {
        "model": cfg.models[0].spec, "generalist": SELF_SPEC, "amount": n, "seed": cfg.seeds[0],
        "weights": str(weights), "config": tc.model_dump(mode="json"), "train_s": train_s})  # fmt: skip
    return weights


def self_specialization(cfg: ExperimentConfig, store: Store, out: Path) -> None:
    """The synth block: iteration 1 per retrieval variant, then (optionally) iteration 2 from one of their
    specialists, each tuned and evaluated when `synth_stage` is set (Kang et al. Tables 1 and 2)."""
    assert cfg.synth is not None
    single = len(cfg.retrievals) == 1 and cfg.iteration2 is None  # the one-round layout of earlier runs
    adapters: dict[str, Path] = {}
    for r in cfg.retrievals:
        data = _synth(cfg, out, None if single else f"it1-{r}", retrieval=r)
        if r == cfg.retrievals[0]:
            store.set_meta("synth", str(data.parent))
        if cfg.synth_stage is not None:
            # the first variant is the study's specialist (Tables 1 and 4, every k); the others are Table 2's
            shots = None if r == cfg.retrievals[0] else cfg.variant_shots
            adapters[r] = _self_specialize(cfg, store, data, f"{SELF_SPEC}-it1" + ("" if single else f"-{r}"), shots)
    it2 = cfg.iteration2
    if it2 is None:
        return
    for mode in it2.instructions:
        # the same instruction set is answered again; a new one is written by the specialist, contrasted too
        reuse = {"instructions_from": str(out / "synth" / f"it1-{it2.after}")} if mode == "same" else {}
        data = _synth(cfg, out, f"it2-{mode}", retrieval=it2.after, adapter=str(adapters[it2.after]),
                      contrastive=True, alpha=it2.alpha, iteration=2, **reuse)  # fmt: skip
        _self_specialize(cfg, store, data, f"{SELF_SPEC}-it2-{mode}", cfg.variant_shots)


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One runner per cache at a time: two processes training the same stage would corrupt its checkpoints."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(
                f"{cache} is in use by another `specialize run` ({f.read().strip() or 'unknown'}); "
                "wait for it or give this experiment another cache_dir"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run (or resume, or extend) the experiment; returns the results store."""
    with cache_lock(cfg.cache):
        return _run(cfg)


def _run(cfg: ExperimentConfig) -> Path:
    out = Path(cfg.output_dir)
    store = Store(out / "results.sqlite")
    store.set_meta("config", cfg.model_dump(mode="json"))
    if cfg.synth:
        self_specialization(cfg, store, out)
    if cfg.include_base:
        for m in range(len(cfg.models)):
            ec, eval_dir = eval_config(cfg, m, None)
            _evaluate_into(store, BASE_RUN if len(cfg.models) == 1 else f"m{m}-{BASE_RUN}", ec, eval_dir, {
                "model": cfg.models[m].spec, "generalist": "none", "amount": 0, "seed": 0, "weights": None,
                "config": None, "train_s": 0.0})  # fmt: skip
    exclude = evaluation_ids(cfg)
    for run in expand(cfg):
        tc = train_config(cfg, run, exclude)
        weights, train_s = _train(tc)
        ec, eval_dir = eval_config(cfg, run.model_index, weights)
        _evaluate_into(store, run.run_id(cfg), ec, eval_dir, {
            "model": cfg.models[run.model_index].spec, "generalist": run.generalist_name, "amount": run.amount,
            "seed": run.seed, "weights": str(weights), "config": tc.model_dump(mode="json"),
            "train_s": train_s})  # fmt: skip
    return out / "results.sqlite"
