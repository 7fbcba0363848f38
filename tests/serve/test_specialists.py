"""The acceptance scenario: the embedded base plus two LoRA specialists trained by the training stage on
different tasks, served at once and driven with the real `openai` client in mixed batches."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import openai
import pytest

from specialize.serve.server import ServeConfig, running
from specialize.train import TrainConfig, run_training
from specialize.train.mixing import SourceSpec, load_source

TASKS = {"sst2": "task363_sst2_polarity_classification", "s140": "task195_sentiment140_classification"}
LABELS = {"sst2": {"POS", "NEG"}, "s140": {"positive", "negative"}}


@pytest.fixture(scope="module")
def specialists(tmp_path_factory, shared_data: Path) -> dict[str, tuple[str, list]]:
    """name -> (adapter dir, held-out examples of its task)."""
    out = {}
    for name, task in TASKS.items():
        source = {"path": str(shared_data / "superni/tasks"), "tasks": [task], "amount": 32}
        cfg = TrainConfig.model_validate({
            "model": {"spec": "embedded", "threads": 2}, "method": "lora", "save_every": 0, "progress": False,
            "output_dir": str(tmp_path_factory.mktemp(name)),
            "stages": [{"name": name, "sources": [source], "epochs": 2, "batch_size": 8, "micro_batch_size": 8,
                        "lr": 1e-3, "max_length": 192}],
        })  # fmt: skip
        [res] = run_training(cfg)
        chosen = set(json.loads((Path(res.dir) / "data.json").read_text())["sources"][0]["ids"])
        pool = load_source(SourceSpec(path=source["path"], tasks=[task])).records
        out[name] = (res.output, [r for r in pool if r.id not in chosen][:12])
    return out


@pytest.mark.slow
def test_each_specialist_answers_in_its_own_task_format_in_mixed_batches(specialists):
    cfg = ServeConfig(model={"spec": "embedded", "threads": 2}, port=0, max_batch_size=16, batch_wait_ms=200,
                      adapters={name: str(path) for name, (path, _) in specialists.items()})  # fmt: skip
    jobs = [(model, task, ex) for task, (_, examples) in specialists.items() for ex in examples
            for model in ("base", "sst2", "s140")]  # fmt: skip
    with running(cfg) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        async def ask(model: str, ex) -> str:
            r = await client.chat.completions.create(
                model=model, max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": f"{ex.instruction}\n\n{ex.input}"}])  # fmt: skip
            return r.choices[0].message.content.strip()

        async def all_at_once() -> list[str]:  # concurrent requests: waves mix base and both adapters
            return await asyncio.gather(*(ask(m, ex) for m, _, ex in jobs))

        answers = asyncio.run(all_at_once())
        with urllib.request.urlopen(url + "/stats") as r:
            stats = json.loads(r.read())
    by = {}
    for (model, task, _), a in zip(jobs, answers, strict=True):
        by.setdefault((model, task), []).append(a)
    for key, values in sorted(by.items()):
        print(key, values)
    assert stats["mixed_steps"] >= 1
    # each specialist answers its own task with its own label vocabulary...
    for name in TASKS:
        own = by[(name, name)]
        assert sum(a in LABELS[name] for a in own) >= 0.9 * len(own), (name, own)
    # ...so the two specialists answer the same SST-2 requests differently, and the base model uses neither format
    assert sum(a in LABELS["sst2"] for a in by[("s140", "sst2")]) <= 0.5 * len(by[("s140", "sst2")])
    base = by[("base", "sst2")] + by[("base", "s140")]
    assert sum(a in LABELS["sst2"] | LABELS["s140"] for a in base) <= 0.5 * len(base)
