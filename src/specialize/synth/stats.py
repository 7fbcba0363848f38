"""Statistics of a synthetic dataset: counts at every filter, and instruction diversity as JSON and a PNG.

Diversity follows the spirit of the paper's Figure 6 (verbs of instructions and their objects) with a
dependency-free approximation: the first word of an instruction is taken as its verb (instructions are
imperatives or questions), and the first following content word as its object.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from specialize.data import Example
from specialize.io import atomic_path, atomic_write_text
from specialize.synth.filters import HEURISTICS

STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "for",
        "and",
        "or",
        "on",
        "with",
        "is",
        "are",
        "this",
        "that",
        "these",
        "given",
        "following",
        "all",
        "each",
        "any",
        "its",
        "their",
        "your",
        "you",
        "me",
        "it",
        "be",
        "which",
    ]
)


_LEAD = re.compile(r"^(in|for|given|as|after|using)\b[^,]{0,60},\s*", re.IGNORECASE)
# what stands before the verb of an imperative: "Your task is to classify", "You need to list", "Please name",
# "To summarize" (a bare "to" was counted as the most common verb)
_PRE_VERB = re.compile(
    r"^((please|kindly)\s+|(your|the) task is to\s+|you (are|will be) (asked|required|expected) to\s+|"
    r"you (need|have|must|should|will) (to\s+)?|to\s+)+",
    re.IGNORECASE,
)


def verb_object(instruction: str) -> tuple[str, str]:
    instruction = _LEAD.sub("", instruction.strip())  # "In this task, ..." -> what follows
    instruction = _PRE_VERB.sub("", instruction)
    words = [w.strip(".,:;?!()\"'").lower() for w in instruction.split()]
    words = [w for w in words if w]
    verb = words[0] if words else ""
    obj = next((w for w in words[1:] if w not in STOP and w.isalpha()), "")
    return verb, obj


def diversity(examples: Sequence[Example]) -> dict:
    pairs = [verb_object(e.instruction) for e in examples]
    verbs = Counter(v for v, _ in pairs)
    objects = Counter(o for _, o in pairs if o)
    input_words = Counter(w.lower() for e in examples for w in e.input.split() if w.isalpha() and w.lower() not in STOP)
    return {
        "instructions": len(examples),
        "unique_verbs": len(verbs),
        "unique_objects": len(objects),
        "unique_verb_object_pairs": len(set(pairs)),
        "top_verbs": verbs.most_common(20),
        "top_verb_object_pairs": Counter(f"{v} {o}" for v, o in pairs).most_common(20),
        "top_input_words": input_words.most_common(20),
        "with_input": sum(bool(e.input) for e in examples),
        "mean_instruction_words": sum(len(e.instruction.split()) for e in examples) / max(1, len(examples)),
        "mean_output_words": sum(len(e.output.split()) for e in examples) / max(1, len(examples)),
    }


# Filters in the order the pipeline applies them (`Pool.offer_batch`): self-instruct heuristics, then exact and
# ROUGE-L duplicates; a response that comes back empty is dropped last.
FILTER_ORDER = (*(f"rejected_{h}" for h in HEURISTICS), "rejected_exact_duplicate", "rejected_rouge_near_duplicate")


def funnel(counts: dict[str, int], final: int) -> list[tuple[str, int]]:
    """(stage, count) in pipeline order: the items the model generated, those lost while parsing, those parsed
    after the pool was full, those offered to the filters, each filter's rejections, kept, and final examples."""
    parse = sorted((k, v) for k, v in counts.items() if k.startswith("parse_"))
    generated = sum(v for _, v in parse) + counts.get("parsed", 0) + counts.get("beyond_target", 0)
    filters = [k for k in FILTER_ORDER if counts.get(k)]
    filters += sorted(k for k in counts if k.startswith("rejected_") and k not in FILTER_ORDER
                      and k != "rejected_empty_response")  # fmt: skip
    return [
        ("generated", generated), *parse, ("beyond_target", counts.get("beyond_target", 0)),
        ("parsed", counts.get("parsed", 0)), *((k, counts[k]) for k in filters), ("kept", counts.get("kept", 0)),
        ("rejected_empty_response", counts.get("rejected_empty_response", 0)), ("final examples", final),
    ]  # fmt: skip


def write_stats(out: Path, counts: Counter, examples: Sequence[Example]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = funnel(counts, len(examples))
    stats = {"filters": dict(counts), "funnel": steps, "final_examples": len(examples),
             "diversity": diversity(examples)}  # fmt: skip
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    stages = [(k, v) for k, v in steps if v][::-1]  # barh draws bottom-up: the funnel reads top-down
    ax1.barh([k for k, _ in stages], [v for _, v in stages], color="#4c72b0")
    ax1.set_title("generated items through the pipeline")
    top = stats["diversity"]["top_verbs"]
    ax2.barh([v for v, _ in top][::-1], [c for _, c in top][::-1], color="#dd8452")
    ax2.set_title(f"top instruction verbs ({stats['diversity']['unique_verbs']} unique)")
    fig.tight_layout()
    with atomic_path(out / "stats.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return stats
