"""Per-example metrics, each a plain function of (prediction, references) returning 0-100.

ROUGE-L is the Super-NaturalInstructions scorer's: rouge-score's rougeL F-measure with the Porter stemmer
and its default tokenizer (lower-cased ASCII alphanumerics; other characters separate tokens and
vanish), maximized over references. Exact match and token F1 follow SQuAD v1.1's normalization;
`remove_articles=False` gives the SuperNI scorer's variant of exact match.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str, *, remove_articles: bool = True) -> str:
    """SQuAD v1.1: lower-case, drop punctuation, (drop articles), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    if remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _best(fn: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("at least one reference is required")
    return 100.0 * max(fn(prediction, r) for r in references)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    scorer = _rouge_scorer()
    return _best(lambda p, r: scorer.score(target=r, prediction=p)["rougeL"].fmeasure, prediction, references)


def exact_match(prediction: str, references: Sequence[str], *, remove_articles: bool = True) -> float:
    def em(p: str, r: str) -> float:
        return float(
            normalize_answer(p, remove_articles=remove_articles) == normalize_answer(r, remove_articles=remove_articles)
        )

    return _best(em, prediction, references)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 over normalized whitespace tokens."""

    def f1(p: str, r: str) -> float:
        pred, ref = normalize_answer(p).split(), normalize_answer(r).split()
        if not pred or not ref:
            return float(pred == ref)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    return _best(f1, prediction, references)


def accuracy(prediction: str, references: Sequence[str]) -> float:
    """Exact string identity with any reference (for option-ranking predictions, which are option strings)."""
    return _best(lambda p, r: float(p == r), prediction, references)


def entity_f1(prediction: str, references: Sequence[str]) -> float:
    """F1 between comma-separated entity lists (case- and whitespace-insensitive; "None" = empty list)."""

    def parse(text: str) -> Counter[str]:
        items = [" ".join(x.lower().split()) for x in text.split(",")]
        return Counter(x for x in items if x and x != "none")

    def f1(p: str, r: str) -> float:
        pred, ref = parse(p), parse(r)
        if not pred and not ref:
            return 1.0
        common = sum((pred & ref).values())
        if common == 0:
            return 0.0
        precision, recall = common / sum(pred.values()), common / sum(ref.values())
        return 2 * precision * recall / (precision + recall)

    return _best(f1, prediction, references)


METRICS: dict[str, Callable[..., float]] = {
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "exact_match_superni": lambda p, r: exact_match(p, r, remove_articles=False),
    "token_f1": token_f1,
    "accuracy": accuracy,
    "entity_f1": entity_f1,
}

# The metric a task is compared on when it reports several, in order of preference: accuracy for option
# ranking, ROUGE-L for SuperNI generation (Wang et al.), token F1 before exact match (Shi et al. and Kang et al.
# report F1 for open answers). Used by `specialize eval`, the experiment runner and the report alike.
PRIMARY_ORDER = ("accuracy", "rouge_l", "token_f1", "exact_match", "entity_f1", "accuracy_norm")


def primary_metric(metrics: Iterable[str]) -> str:
    """The primary metric among the ones a task reports."""
    have = set(metrics)
    if not have:
        raise ValueError("a task with no metrics has no primary metric")
    return next((m for m in PRIMARY_ORDER if m in have), min(have))
