"""Self-specialization, one readable flow: seeds -> instructions -> filters -> retrieval -> responses -> data.

    specialize synth --domain biomedical --seeds BoX_instructions.json --corpus corpus.jsonl.gz --num 200

Resumable by construction. Every model call writes one JSON line to an append-only log (instruction batches
to `instructions.log.jsonl`, response batches to `responses.log.jsonl`), and each batch is a pure function of
(config, batch index): its demos and its sampling seed derive from them (prompt p samples with the batch's
seed + p, on its own generator). A rerun replays the logs (a line cut off by a kill is dropped), rebuilds the
filtered pool exactly, and continues with the next batch, so the final `data.jsonl` equals an uninterrupted
run's. The output directory is keyed by a hash of the config
(model, adapter, prompts, sampling parameters): reusing it with another config is refused.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from specialize import models
from specialize.config import ConfigError, ModelConfig, Retrieval
from specialize.data import Example, write_jsonl
from specialize.data.sources import DataSource
from specialize.generation import Output, Request, SamplingParams, mixture_requests, retrieval_weights
from specialize.generation.engines import HFEngine, TextEngine, engine_for, run_split
from specialize.hashing import file_sha256, fingerprint
from specialize.io import append_log, atomic_write_text, read_log
from specialize.prompts import encode_prompt
from specialize.synth.filters import RougePool, heuristic_reject
from specialize.synth.prompts import (
    INSTRUCTION_PROMPT,
    RESPONSE_PREAMBLE,
    ExpertTemplate,
    clip_words,
    instruction_prompt,
    parse_generated,
)

SPECIALIST = "specialist"  # the adapter's name when generating with a specialized model (iteration >= 2)


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: str = "biomedical"
    model: ModelConfig = ModelConfig()
    adapter: str | None = Field(None, description="generate with a specialized adapter (iteration >= 2)")
    contrastive: bool = Field(False, description="with an adapter: contrastive decoding against the base (eq. 3)")
    alpha: float = Field(0.1, gt=0, le=1, description="plausibility cutoff of contrastive decoding")
    iteration: int = Field(1, ge=1)
    seeds: str | list[DataSource] = Field(
        description="a seed file, or sources (e.g. the training part of a seeded split of each benchmark)"
    )
    seeds_format: str | None = Field(None, description="the format of a seed file given as a path")
    seeds_per_task: int = Field(5, ge=1, description="at most this many seeds of each task (or source), file order")
    corpus: str | None = None
    retrieval: Retrieval = "marginalize"
    top_k: int = Field(5, ge=1)
    num: int = Field(200, ge=1, description="instructions to keep after filtering")
    demos_per_prompt: int = Field(3, ge=1)
    require_input: bool = Field(True, description="drop generated items without an Input line")
    demo_input_words: int | None = Field(None, ge=1, description="clip demo inputs in the prompt (None: keep all)")
    document_words: int | None = Field(None, ge=1, description="clip retrieved documents (None: keep all)")
    list_size: int = Field(20, ge=2, description="the n of 'come up with n tasks'")
    batch_size: int = Field(8, ge=1, description="prompts per generation batch")
    max_batches: int = Field(500, ge=1, description="bound on instruction-generation batches")
    instruction_sampling: SamplingParams = SamplingParams(max_new_tokens=512, temperature=1.0, top_p=0.98)
    # a new "###" section means the answer is over (models continue the Alpaca layout otherwise)
    response_sampling: SamplingParams = SamplingParams(max_new_tokens=256, temperature=0.0, stop=("###",))
    rouge_threshold: float = Field(0.7, gt=0, le=1)
    min_words: int = 3
    max_words: int = 150
    instruction_prompt_file: str | None = None
    response_prompt_file: str | None = None
    seed: int = 0
    output_dir: str = "runs/synth"
    instructions_root: str | None = Field(
        None,
        description="keep the instruction stage under this directory, keyed by the settings that shape it, so "
        "runs that differ only in how responses are made share it (Table 2's retrieval variants); None: in "
        "output_dir",
    )
    instructions_from: str | None = Field(
        None,
        description="a finished synth run whose instructions are answered again instead of writing new ones "
        "(Table 2's second iteration on the same instruction set)",
    )

    def _blob(self, exclude: set[str]) -> dict[str, Any]:
        # where things are kept and how far a run goes (num, max_batches: extending continues the logs) are not
        # content; instructions_from enters as the content it names
        blob = self.model_dump(mode="json", exclude={"output_dir", "num", "max_batches", "instructions_root",
                                                     "instructions_from", *exclude})  # fmt: skip
        blob["model"] = self.model.hashed()
        blob["model_info"] = models.model_identity(self.model.spec)
        if self.adapter:
            blob["adapter_sha256"] = file_sha256(Path(self.adapter) / models.ADAPTER_WEIGHTS)
        for key in ("instruction_prompt_file", "response_prompt_file"):
            if blob.get(key):
                blob[key + "_text"] = Path(blob[key]).read_text()
        return blob

    def fingerprint(self) -> str:
        blob = self._blob(set())
        if self.instructions_from:
            blob["instructions_sha256"] = file_sha256(Path(self.instructions_from) / INSTRUCTIONS)
        return fingerprint(blob, length=None)

    def instruction_fingerprint(self) -> str:
        """The settings that shape the instruction stage: everything but how responses are made."""
        return fingerprint(self._blob(RESPONSE_FIELDS), length=None)

    @property
    def instruction_dir(self) -> Path:
        if self.instructions_root is None:
            return Path(self.output_dir)
        return Path(self.instructions_root) / f"instructions-{self.instruction_fingerprint()[:16]}"


# the settings that only change how responses are made: runs differing in nothing else share their instructions
RESPONSE_FIELDS = {"corpus", "retrieval", "top_k", "document_words", "response_sampling", "response_prompt_file"}
INSTRUCTIONS = "instructions.json"  # a run's accepted instructions and filter counts, once the stage is complete


@dataclass
class Instructions:
    """The accepted instructions of a finished instruction stage (each a dict with id, instruction, input, demo
    ids, batch, sampling seed, time, engine) and the filters' counts."""

    items: list[dict[str, Any]]
    counts: Counter[str]

    def write(self, path: Path, instruction_fingerprint: str) -> None:
        atomic_write_text(path, json.dumps({"instruction_fingerprint": instruction_fingerprint,
                                            "items": self.items, "counts": dict(self.counts)}))  # fmt: skip

    @classmethod
    def read(cls, run_dir: str | Path) -> Instructions:
        path = Path(run_dir) / INSTRUCTIONS
        if not path.is_file():
            raise ConfigError(f"{path}: no finished instruction stage there (run that synth first)")
        data = json.loads(path.read_text())
        return cls(data["items"], Counter(data["counts"]))


# ---------------------------------------------------------------------------------------------- steps


def load_seeds(cfg: SynthConfig) -> list[Example]:
    """At most `seeds_per_task` examples per task, in file order (sources in the order given)."""
    sources = [DataSource(path=cfg.seeds, format=cfg.seeds_format)] if isinstance(cfg.seeds, str) else cfg.seeds
    per_task: Counter[str] = Counter()
    seeds = []
    for r in (r for source in sources for r in source.read()):
        key = r.task or r.source
        if per_task[key] < cfg.seeds_per_task:
            seeds.append(r)
            per_task[key] += 1
    if len(seeds) < cfg.demos_per_prompt:
        where = cfg.seeds if isinstance(cfg.seeds, str) else ", ".join(s.path for s in cfg.seeds)
        raise ConfigError(f"{where}: {len(seeds)} seeds, fewer than demos_per_prompt={cfg.demos_per_prompt}")
    return seeds


def _batch_plan(cfg: SynthConfig, seeds: list[Example], batch: int) -> tuple[list[list[Example]], int]:
    """Demos of each prompt in a batch, and the batch's sampling seed: pure functions of (seed, batch)."""
    rng = random.Random(f"{cfg.seed}:instructions:{batch}")
    demos = [rng.sample(seeds, cfg.demos_per_prompt) for _ in range(cfg.batch_size)]
    return demos, rng.randrange(2**31)


class Pool:
    """Accepted instructions in order, with filter accounting; replaying the same batches rebuilds it exactly."""

    def __init__(self, cfg: SynthConfig, seeds: list[Example]):
        self.cfg = cfg
        self.rouge = RougePool(cfg.rouge_threshold)
        self.seen: set[str] = set()
        for s in seeds:  # new instructions must also differ from the seeds
            self.rouge.add(s.instruction)
            self.seen.add(s.instruction.strip().lower())
        self.items: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def offer_batch(self, record: dict[str, Any]) -> None:
        for p, out in enumerate(record["outputs"]):
            first = self.cfg.demos_per_prompt + 1
            parsed, counts = parse_generated(out["text"], first, truncated=out["finish_reason"] == "length",
                                             require_input=self.cfg.require_input)  # fmt: skip
            self.counts.update({f"parse_{k}": v for k, v in counts.items()})
            for i, item in enumerate(parsed):
                if len(self.items) >= self.cfg.num:
                    self.counts["beyond_target"] += 1
                    continue
                self.counts["parsed"] += 1
                reason = heuristic_reject(item.instruction, min_words=self.cfg.min_words, max_words=self.cfg.max_words)
                key = item.instruction.strip().lower()
                if reason is None and key in self.seen:
                    reason = "exact_duplicate"
                if reason is None and self.rouge.near_duplicate(item.instruction):
                    reason = "rouge_near_duplicate"
                if reason is not None:
                    self.counts[f"rejected_{reason}"] += 1
                    continue
                self.rouge.add(item.instruction)
                self.seen.add(key)
                self.counts["kept"] += 1
                self.items.append({
                    "id": f"it{self.cfg.iteration}-b{record['batch']:04d}-p{p:02d}-i{i:02d}",
                    "instruction": item.instruction, "input": item.input, "demo_ids": out["demo_ids"],
                    "batch": record["batch"], "sampling_seed": record["sampling_seed"] + p,
                    "generated_at": record["time"], "engine": out.get("engine", "hf"),
                })  # fmt: skip

    @property
    def full(self) -> bool:
        return len(self.items) >= self.cfg.num


def _contrastive(cfg: SynthConfig) -> float | None:
    """Eq. 3's alpha when generating with the specialist against the base (its adapter switched off)."""
    return cfg.alpha if cfg.adapter and cfg.contrastive else None


def _seeded(params: SamplingParams, seed: int, n: int) -> list[SamplingParams]:
    """Each of a batch's n requests samples with its own seed: the batch's seed + its position."""
    return [params.model_copy(update={"seed": seed + i}) for i in range(n)]


@dataclass
class Engines:
    """The configured engine and the transformers engine, which runs what the first cannot compute exactly."""

    main: TextEngine
    fallback: TextEngine

    def run(self, requests: list[Request], what: str) -> tuple[list[Output], list[str]]:
        """Outputs, and the name of the engine that made each (the provenance records it)."""
        return run_split(self.main, self.fallback, requests, what)


def generate_instructions(cfg: SynthConfig, engines: Engines, tokenizer, seeds: list[Example], out: Path,
                          progress) -> Instructions:  # fmt: skip
    """The instruction stage in `out` (its log: resumable, shareable), generated until `cfg.num` are kept."""
    log = out / "instructions.log.jsonl"
    template_text = Path(cfg.instruction_prompt_file).read_text() if cfg.instruction_prompt_file else INSTRUCTION_PROMPT
    pool = Pool(cfg, seeds)
    done = read_log(log)
    for record in done:
        pool.offer_batch(record)
    task = progress.add_task("instructions", total=cfg.num, completed=len(pool.items))
    batch = len(done)
    while not pool.full:
        if batch >= cfg.max_batches:
            raise RuntimeError(f"{cfg.max_batches} batches gave only {len(pool.items)} of {cfg.num} instructions")
        demos, sampling_seed = _batch_plan(cfg, seeds, batch)
        prompts = [instruction_prompt(cfg.domain, d, cfg.list_size, template_text, cfg.demo_input_words) for d in demos]
        ids = [[tokenizer(p)["input_ids"]] for p in prompts]  # raw text continuation: no chat/Alpaca wrapper
        params = _seeded(cfg.instruction_sampling, sampling_seed, len(ids))
        requests = mixture_requests(ids, [[1.0]] * len(ids), params, contrastive=_contrastive(cfg))
        decoded, engine = engines.run(requests, "synth instructions")
        record = {
            "batch": batch, "sampling_seed": sampling_seed, "time": time.time(),
            "outputs": [{"demo_ids": [x.id for x in d], "text": o.text, "finish_reason": o.finish_reason,
                         "engine": e} for d, o, e in zip(demos, decoded, engine, strict=True)],
        }  # fmt: skip
        append_log(log, record)
        pool.offer_batch(record)
        progress.update(task, completed=len(pool.items))
        batch += 1
    return Instructions(pool.items, pool.counts)


def generate_responses(cfg: SynthConfig, engines: Engines, tokenizer, pool: Instructions, out: Path,
                       progress) -> dict[str, dict]:  # fmt: skip
    from specialize.synth.retrieval import Retriever

    log = out / "responses.log.jsonl"
    done = {r["id"]: {**r, "generated_at": rec["time"]} for rec in read_log(log) for r in rec["items"]}
    todo = [it for it in pool.items if it["id"] not in done]
    retriever = Retriever.build(cfg.corpus, out / "index") if cfg.corpus and cfg.retrieval != "none" else None
    k = 1 if cfg.retrieval in ("top1", "none") else cfg.top_k
    task = progress.add_task("responses", total=len(pool.items), completed=len(done))
    preamble = Path(cfg.response_prompt_file).read_text() if cfg.response_prompt_file else RESPONSE_PREAMBLE
    for start in range(0, len(todo), cfg.batch_size):
        items = todo[start : start + cfg.batch_size]
        hits = (
            retriever.search([f"{it['instruction']} {it['input']}" for it in items], k)
            if retriever
            else [[]] * len(items)
        )
        contexts, weights = [], []
        for it, hs in zip(items, hits, strict=True):
            docs = [clip_words(h.text, cfg.document_words) for h in hs] or [None]
            templates = [ExpertTemplate(cfg.domain, d, preamble) for d in docs]
            contexts.append([encode_prompt(t.render(it["instruction"], it["input"]), t, tokenizer) for t in templates])
            weights.append(retrieval_weights([h.score for h in hs]) if hs else [1.0])
        seed = random.Random(f"{cfg.seed}:responses:{items[0]['id']}").randrange(2**31)
        params = _seeded(cfg.response_sampling, seed, len(items))
        requests = mixture_requests(contexts, weights, params, contrastive=_contrastive(cfg))
        decoded, engine = engines.run(requests, "synth responses")
        record = {"time": time.time(), "items": [
            {"id": it["id"], "output": o.text.strip(),
             "finish_reason": o.finish_reason, "docs": [h.doc_id for h in hs],
             "doc_scores": [h.score for h in hs], "weights": w, "sampling_seed": p.seed, "engine": e}
            for it, o, hs, w, p, e in zip(items, decoded, hits, weights, params, engine, strict=True)]}  # fmt: skip
        append_log(log, record)
        for r in record["items"]:
            done[r["id"]] = {**r, "generated_at": record["time"]}
        progress.update(task, completed=len(done))
    return done


def assemble(cfg: SynthConfig, pool: Instructions, responses: dict[str, dict]) -> tuple[list[Example], Counter]:
    model_info = models.model_identity(cfg.model.spec)
    adapter_hash = file_sha256(Path(cfg.adapter) / models.ADAPTER_WEIGHTS) if cfg.adapter else None
    examples, counts = [], Counter()
    for it in pool.items:
        r = responses[it["id"]]
        if not r["output"]:
            counts["rejected_empty_response"] += 1
            continue
        examples.append(Example(
            id=it["id"], instruction=it["instruction"], input=it["input"], output=r["output"],
            task=f"synth-{cfg.domain}", source=f"self-specialization-it{cfg.iteration}",
            metadata={"provenance": {
                "seed_demo_ids": it["demo_ids"], "instruction_batch": it["batch"],
                "instruction_sampling": {**cfg.instruction_sampling.model_dump(), "seed": it["sampling_seed"]},
                "response_sampling": {**cfg.response_sampling.model_dump(), "seed": r["sampling_seed"]},
                "retrieval": cfg.retrieval, "docs": r["docs"], "doc_scores": r["doc_scores"], "weights": r["weights"],
                "response_finish_reason": r["finish_reason"], "model": model_info,
                # which engine wrote each part (older logs predate the choice: the transformers engine)
                "engine": {"instruction": it["engine"], "response": r.get("engine", "hf")},
                "adapter_sha256": adapter_hash, "contrastive": cfg.contrastive and bool(cfg.adapter),
                "iteration": cfg.iteration,
            }, "timestamps": {"instruction": it["generated_at"], "response": r["generated_at"]}},
        ))  # fmt: skip
    return examples, counts


def _claim(directory: Path, key: str, value: str, cfg: SynthConfig) -> None:
    """Mark `directory` as holding the work of this `key` (a fingerprint); one holding other work is refused."""
    meta = directory / "config.json"
    if meta.is_file() and json.loads(meta.read_text()).get(key) != value:
        raise ConfigError(f"{directory} holds a run with a different config; use another output_dir")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps({key: value, "config": cfg.model_dump(mode="json")}, indent=1))


def run_synth(cfg: SynthConfig, *, progress: bool = True) -> Path:
    """Run (or resume) the whole flow; returns the path of `data.jsonl`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from specialize.synth.stats import write_stats

    if cfg.retrieval != "none" and not cfg.corpus:
        raise ConfigError("retrieval needs a corpus (or set retrieval: none)")
    if cfg.contrastive and not cfg.adapter:
        raise ConfigError("contrastive decoding needs an adapter (the specialized model) to contrast with the base")
    if cfg.adapter:
        models.check_adapter(SPECIALIST, cfg.adapter)
    out = Path(cfg.output_dir)
    seeds = load_seeds(cfg)
    reused = Instructions.read(cfg.instructions_from) if cfg.instructions_from else None
    _claim(out, "fingerprint", cfg.fingerprint(), cfg)
    idir = cfg.instruction_dir
    if reused is None and idir != out:
        _claim(idir, "instruction_fingerprint", cfg.instruction_fingerprint(), cfg)
    write_jsonl(seeds, out / "seeds.jsonl")

    # synth renders its own prompts (raw continuation, the expert template), so no checkpoint template applies
    rt = models.load_runtime(cfg.model, adapters={SPECIALIST: cfg.adapter} if cfg.adapter else None)
    hf = HFEngine(rt.model, rt.tokenizer, rt.precision, batch_size=64)
    engines = Engines(engine_for(rt, cfg.model) if cfg.model.engine != "hf" else hf, hf)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        pool = reused or generate_instructions(cfg, engines, rt.tokenizer, seeds, idir, bar)
        pool.write(out / INSTRUCTIONS, cfg.instruction_fingerprint())
        responses = generate_responses(cfg, engines, rt.tokenizer, pool, out, bar)
    examples, counts = assemble(cfg, pool, responses)
    data = out / "data.jsonl"
    write_jsonl(examples, data)
    write_stats(out, pool.counts + counts, examples)
    return data
