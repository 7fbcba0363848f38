"""The real thing, small: the embedded model, LoRA, 500 SuperNI sentiment examples, one epoch."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from specialize.eval.loglik import response_logliks
from specialize.models import load_model
from specialize.prompts import AlpacaTemplate
from specialize.train import TrainConfig, run_training
from specialize.train.mixing import SourceSpec, load_source

TASKS = [
    "task195_sentiment140_classification", "task363_sst2_polarity_classification",
    "task833_poem_sentiment_classification", "task888_reviews_classification", "task761_app_review_classification",
]  # fmt: skip


def accuracy(model, tok, examples, options_by_task) -> float:
    """Pick the label with the highest log-likelihood among the task's labels."""
    t = AlpacaTemplate()
    flat = [(e, o) for e in examples for o in options_by_task[e.task]]
    scores = response_logliks(model, tok, [e for e, _ in flat], t, [o for _, o in flat])
    best: dict[str, tuple[float, str]] = {}
    for (e, o), s in zip(flat, scores, strict=True):
        if e.id not in best or s.total > best[e.id][0]:
            best[e.id] = (s.total, o)
    return sum(best[e.id][1] == e.output for e in examples) / len(examples)


@pytest.mark.slow
def test_lora_on_sentiment_lowers_loss_and_raises_heldout_label_likelihood(tmp_path: Path, shared_data: Path):
    source = {"path": str(shared_data / "superni/tasks"), "tasks": TASKS, "amount": 320}
    cfg = TrainConfig.model_validate({
        "model": {"spec": "embedded", "threads": 2}, "method": "lora", "output_dir": str(tmp_path),
        "save_every": 0, "progress": False,
        "stages": [{"name": "sentiment", "sources": [source], "epochs": 1, "batch_size": 16, "micro_batch_size": 16,
                    "lr": 5e-4, "max_length": 256}],
    })  # fmt: skip
    [res] = run_training(cfg)
    losses = [json.loads(x)["loss"] for x in (Path(res.dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20  # 320 / 16
    assert statistics.mean(losses[-5:]) < 0.5 * losses[0]

    chosen = set(json.loads((Path(res.dir) / "data.json").read_text())["sources"][0]["ids"])
    pool = load_source(SourceSpec(path=source["path"], tasks=TASKS)).records
    heldout = [r for r in pool if r.id not in chosen]
    assert len(heldout) == len(pool) - 320
    heldout = heldout[:: len(heldout) // 60][:60]
    options: dict[str, set[str]] = defaultdict(set)
    for r in pool:
        options[r.task].add(r.output)
    options_by_task = {k: sorted(v) for k, v in options.items()}

    from peft import PeftModel

    base, tok = load_model("embedded", dtype="float32", threads=2)
    t = AlpacaTemplate()
    before = statistics.mean(x.total for x in response_logliks(base, tok, heldout, t))
    acc_before = accuracy(base, tok, heldout, options_by_task)
    tuned = PeftModel.from_pretrained(base, res.output)
    after = statistics.mean(x.total for x in response_logliks(tuned, tok, heldout, t))
    acc_after = accuracy(tuned, tok, heldout, options_by_task)
    print(f"held-out label log-lik {before:.3f} -> {after:.3f}; accuracy {acc_before:.3f} -> {acc_after:.3f}")
    assert after > before + 1.0
    assert acc_after > acc_before
