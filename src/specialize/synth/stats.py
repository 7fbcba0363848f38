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


_LEAD = re.compile(r"^(in|for|given|as|after|using)\b[^,]{0,60},\s*(your task is to\s+)?", re.IGNORECASE)


def verb_object(instruction: str) -> tuple[str, str]:
    instruction = _LEAD.sub("", instruction.strip())  # "In this task, ..." -> what follows
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


def write_stats(out: Path, counts: Counter, examples: Sequence[Example]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = {"filters": dict(sorted(counts.items())), "final_examples": len(examples), "diversity": diversity(examples)}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    stages = [(k, v) for k, v in sorted(counts.items()) if v]
    ax1.barh([k for k, _ in stages], [v for _, v in stages], color="#4c72b0")
    ax1.set_title("generated items at each filter")
    top = stats["diversity"]["top_verbs"]
    ax2.barh([v for v, _ in top][::-1], [c for _, c in top][::-1], color="#dd8452")
    ax2.set_title(f"top instruction verbs ({stats['diversity']['unique_verbs']} unique)")
    fig.tight_layout()
    with atomic_path(out / "stats.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return stats
