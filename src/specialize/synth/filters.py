"""Filters for generated instructions: self-instruct's heuristics, exact duplicates, and near-duplicates by
ROUGE-L against everything already in the pool.

The ROUGE-L filter makes exactly rouge-score's decisions (its tokenizer, its LCS F-measure, no stemming as
in self-instruct) but avoids most LCS computations: LCS(a, b) <= |bag(a) & bag(b)| (shared tokens with
multiplicity), so F <= 2 * overlap / (|a| + |b|); pairs whose bound is under the threshold are skipped.
Overlaps against the whole pool come from an inverted index in one vectorized pass per candidate.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip


def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=False)


# the reasons heuristic_reject gives, in the order it checks them
HEURISTICS = ("too_short", "too_long", "blacklisted_word", "program", "leading_punctuation", "non_english_start")


def heuristic_reject(instruction: str, *, min_words: int = 3, max_words: int = 150) -> str | None:
    """Why self-instruct's heuristics reject an instruction, or None to keep it."""
    words = instruction.split()
    if len(words) <= min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    low = instruction.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", low) for w in BLACKLIST):
        return "blacklisted_word"
    if low.startswith("write a program"):
        return "program"
    if instruction[0] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
        return "leading_punctuation"
    if not instruction[0].isascii() or not instruction[0].isalpha():
        return "non_english_start"
    return None


def lcs_length(a: list[int], b: list[int]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_f(lcs: int, n_candidate: int, n_other: int) -> float:
    """rouge-score's rougeL F-measure from the LCS length, with its exact floating-point steps."""
    if n_candidate == 0 or n_other == 0:
        return 0.0
    precision, recall = lcs / n_candidate, lcs / n_other
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


class _Postings:
    """Growable (instruction index, token count) arrays of one token: amortized O(1) appends, zero-copy views."""

    def __init__(self) -> None:
        self._docs = np.empty(4, dtype=np.int64)
        self._counts = np.empty(4, dtype=np.int64)
        self._n = 0

    def append(self, doc: int, count: int) -> None:
        if self._n == len(self._docs):
            self._docs = np.resize(self._docs, 2 * self._n)
            self._counts = np.resize(self._counts, 2 * self._n)
        self._docs[self._n], self._counts[self._n] = doc, count
        self._n += 1

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self._docs[: self._n], self._counts[: self._n]


@dataclass
class RougePool:
    """Instructions accepted so far, indexed for fast exact near-duplicate checks."""

    threshold: float = 0.7
    _tokenizer: object = field(default_factory=_rouge_tokenizer, repr=False)
    _vocab: dict[str, int] = field(default_factory=dict, repr=False)
    _tokens: list[list[int]] = field(default_factory=list, repr=False)
    _lengths: list[int] = field(default_factory=list, repr=False)
    _postings: dict[int, _Postings] = field(default_factory=lambda: defaultdict(_Postings), repr=False)
    lcs_computed: int = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def _ids(self, text: str) -> list[int]:
        return [self._vocab.setdefault(t, len(self._vocab)) for t in self._tokenizer.tokenize(text)]

    def near_duplicate(self, text: str) -> bool:
        """True when some pool entry has rougeL F >= threshold with `text` (rouge-score's exact value)."""
        cand = self._ids(text)
        if not cand or not self._tokens:
            return False
        overlap = np.zeros(len(self._tokens), dtype=np.int64)
        for tok, count in Counter(cand).items():
            post = self._postings.get(tok)
            if post is not None:  # each entry appears once per posting list, so fancy-index += is exact
                docs, counts = post.view()
                overlap[docs] += np.minimum(counts, count)
        lengths = np.asarray(self._lengths)
        bound = 2 * overlap / (len(cand) + lengths)  # >= the F-measure of every pair
        hopeful = np.flatnonzero(bound >= self.threshold - 1e-9)
        for j in hopeful[np.argsort(-bound[hopeful], kind="stable")]:  # likeliest first: stop at the first hit
            self.lcs_computed += 1
            if rouge_f(lcs_length(cand, self._tokens[j]), len(cand), int(lengths[j])) >= self.threshold:
                return True
        return False

    def add(self, text: str) -> None:
        ids = self._ids(text)
        j = len(self._tokens)
        self._tokens.append(ids)
        self._lengths.append(len(ids))
        for tok, c in Counter(ids).items():
            self._postings[tok].append(j, c)

    def offer(self, text: str) -> bool:
        """Add `text` unless it is a near-duplicate (max rougeL >= threshold) of the pool; True if added."""
        if self.near_duplicate(text):
            return False
        self.add(text)
        return True


@dataclass
class FilterStats:
    counts: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
