"""What several benchmarks share (imported by path: each benchmark runs as a script from this directory)."""

from __future__ import annotations

from pathlib import Path

from specialize.models import EMBEDDED, load_model
from specialize.prompts import AlpacaTemplate, encode_prompt

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_adapters(n: int, out: Path) -> dict[str, str]:
    """n LoRA adapters (r 8, all linear layers, PEFT's default init: they cost what real adapters cost and
    change nothing) on the embedded model, saved under `out`."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(EMBEDDED)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    paths = {}
    for i in range(n):
        paths[f"spec{i}"] = str(out / f"spec{i}")
        model.save_pretrained(paths[f"spec{i}"])
    return paths


def eq2_contexts(tokenizer, records: list[dict], k: int) -> list[list[list[int]]]:
    """Eq. 2's benchmark items: for each Alpaca record, the k abstracts BM25 retrieves from the biomedical corpus
    for its instruction, each followed by the record's rendered prompt (one context, token ids, per document)."""
    from specialize.synth.retrieval import Retriever

    t = AlpacaTemplate()
    retriever = Retriever.build(SHARED / "biomed/corpus/corpus.jsonl.gz", "/tmp/specialize-bench-bm25")
    hits = retriever.search([r["instruction"] for r in records], k)
    return [
        [encode_prompt(f"{h.text}\n\n{t.render(r['instruction'], r['input'])}", t, tokenizer) for h in found]
        for r, found in zip(records, hits, strict=True)
    ]
