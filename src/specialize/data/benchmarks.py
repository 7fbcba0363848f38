"""Readers for evaluation benchmarks whose files need more than a field mapping.

Each turns the published file layout into Examples (instruction written here, in the project's words;
options where the benchmark has a closed answer set) through the same row builder as every other reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from specialize.data.rows import Located, _parse_json, _read_text, _rows_csv, iter_jsonl
from specialize.records import DataError

Row = dict[str, Any]

PUBMEDQA_INSTRUCTION = "Answer the biomedical research question using the abstract. Reply with yes, no, or maybe."
PUBMEDQA_LONG_INSTRUCTION = "Answer the biomedical research question using the abstract, in one or two sentences."
NER_INSTRUCTION = (
    "List every {kind} entity mentioned in the sentence, separated by commas, in order of appearance. "
    "Reply with None if there is none."
)
SNLI_INSTRUCTION = (
    "Does the premise entail the hypothesis, contradict it, or neither? "
    "Reply with entailment, contradiction, or neutral."
)
FPB_INSTRUCTION = (
    "What is the sentiment of this sentence from financial news? Reply with negative, neutral, or positive."
)
CLOSED_QA_INSTRUCTION = "Answer the question with a short phrase."
MC_INSTRUCTION = "Answer the question by choosing one of the options."


def _pubmedqa(path: Path, long: bool) -> Iterator[tuple[int | None, Row]]:
    data, _ = _parse_json(path, _read_text(path))
    if not isinstance(data, dict):
        raise DataError(path, None, None, "expected an object of PubMedQA items keyed by PMID")
    for pmid, item in data.items():
        for key in ("QUESTION", "CONTEXTS", "final_decision"):
            if key not in item:
                raise DataError(path, None, f"{pmid}.{key}", "missing")
        context = "\n".join(item["CONTEXTS"])
        row = {
            "id": f"pubmedqa-{pmid}",
            "instruction": PUBMEDQA_LONG_INSTRUCTION if long else PUBMEDQA_INSTRUCTION,
            "input": f"Abstract: {context}\nQuestion: {item['QUESTION']}",
            "output": item["LONG_ANSWER"] if long else item["final_decision"],
            "options": None if long else ["yes", "no", "maybe"],
            "pmid": pmid,
        }
        yield None, row


def _iob_ner(path: Path) -> Iterator[tuple[int | None, Row]]:
    """CoNLL-style token<TAB>tag lines, blank line between sentences -> sentence and its entity list."""
    tokens: list[str] = []
    entities: list[list[str]] = []
    kinds: set[str] = set()
    start_line = 1

    def flush(line: int) -> Iterator[tuple[int | None, Row]]:
        if tokens:
            kind = " or ".join(sorted(kinds)) if kinds else _ner_kind(path)
            yield (
                start_line,
                {
                    "id": f"{path.stem}-{start_line}",
                    "instruction": NER_INSTRUCTION.format(kind=kind.lower()),
                    "input": " ".join(tokens),
                    "output": ", ".join(" ".join(e) for e in entities) or "None",
                    "references": [", ".join(" ".join(e) for e in entities) or "None"],
                    "entities": [" ".join(e) for e in entities],
                },
            )

    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            yield from flush(lineno)
            tokens, entities, kinds, start_line = [], [], set(), lineno + 1
            continue
        parts = raw.split("\t")
        if len(parts) != 2:
            raise DataError(path, lineno, None, "expected token<TAB>tag")
        token, tag = parts
        if tag.startswith("B-"):
            entities.append([token])
            kinds.add(tag[2:])
        elif tag.startswith("I-") and entities:
            entities[-1].append(token)
        elif tag != "O" and not tag.startswith("I-"):
            raise DataError(path, lineno, "tag", f"unknown IOB tag {tag!r}")
        tokens.append(token)
    yield from flush(0)


def _ner_kind(path: Path) -> str:
    name = path.name.lower()
    return "disease" if "disease" in name or "ncbi" in name else "anatomy" if "anatem" in name else "named"


def _snli(path: Path) -> Iterator[tuple[int | None, Row]]:
    """`path` is the directory with s1.<split>, s2.<split>, labels.<split>; the split is the suffix of path."""
    root, split = path.parent, path.name  # e.g. .../snli/dev
    files = [root / f"{p}.{split}" for p in ("s1", "s2", "labels")]
    for f in files:
        if not f.is_file():
            raise DataError(f, None, None, "missing SNLI file (pass .../snli/<split>, e.g. snli/dev)")
    s1, s2, labels = (_read_text(f).splitlines() for f in files)
    if not len(s1) == len(s2) == len(labels):
        raise DataError(root, None, None, f"s1/s2/labels line counts differ: {len(s1)}/{len(s2)}/{len(labels)}")
    for i, (a, b, label) in enumerate(zip(s1, s2, labels, strict=True), start=1):
        yield (
            i,
            {
                "id": f"snli-{split}-{i}",
                "instruction": SNLI_INSTRUCTION,
                "input": f"Premise: {a.strip()}\nHypothesis: {b.strip()}",
                "output": label.strip(),
                "options": ["entailment", "contradiction", "neutral"],
            },
        )


def _commonsenseqa(path: Path) -> Iterator[tuple[int | None, Row]]:
    for line, row in iter_jsonl(path):
        choices = row.get("choices") or {}
        labels, texts = choices.get("label"), choices.get("text")
        if not labels or not texts or row.get("answerKey") not in labels:
            raise DataError(path, line, "choices/answerKey", "missing or inconsistent")
        unique = list(dict.fromkeys(texts))  # a few questions list one text under two letters
        row = {
            "id": row.get("id"),
            "instruction": MC_INSTRUCTION,
            "input": f"Question: {row['question']}\nOptions: {', '.join(unique)}",
            "output": texts[labels.index(row["answerKey"])],
            "options": unique,
        }
        yield line, row


def _aqua(path: Path) -> Iterator[tuple[int | None, Row]]:
    for line, row in iter_jsonl(path):
        options = row.get("options") or []
        letters = [o.split(")", 1)[0] for o in options]
        if row.get("correct") not in letters:
            raise DataError(path, line, "correct", f"answer {row.get('correct')!r} is not among the options")
        yield (
            line,
            {
                "instruction": "Solve the math word problem and choose the correct option.",
                "input": f"{row['question']}\nOptions: {' '.join(options)}",
                "output": options[letters.index(row["correct"])],
                "options": options,
                "rationale": row.get("rationale", ""),
            },
        )


def _nq_open(path: Path) -> Iterator[tuple[int | None, Row]]:
    for line, row in iter_jsonl(path):
        yield line, {"instruction": CLOSED_QA_INSTRUCTION, "input": row.get("question"), "output": row.get("answer")}


def _webquestions(path: Path) -> Iterator[tuple[int | None, Row]]:
    data, lines = _parse_json(path, _read_text(path))
    for i, row in enumerate(data):
        yield (
            (lines[i] if lines else None),
            {
                "id": row.get("qId"),
                "instruction": CLOSED_QA_INSTRUCTION,
                "input": row.get("qText"),
                "output": row.get("answers"),
            },
        )


def _fpb(path: Path) -> Iterator[tuple[int | None, Row]]:
    # the Kaggle copy (label,news) is latin-1; the HF export (index,sentence,label) is UTF-8
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        encoding = "latin-1"
    names = {0: "negative", 1: "neutral", 2: "positive"}
    for line, row in _rows_csv(path, encoding=encoding):
        text = row.get("news") or row.get("sentence")
        label = row.get("label", "")
        label = names.get(int(label), label) if label.isdigit() else label
        yield (
            line,
            {
                "instruction": FPB_INSTRUCTION,
                "input": text,
                "output": label,
                "options": ["negative", "neutral", "positive"],
            },
        )


# FiQA and SemEval-2017 give sentiment as a score in [-1, 1]; Kang et al. evaluate FiQA-SA as classification.
# Our stated rule: a score within NEUTRAL_BAND of 0 is neutral, above it positive, below it negative.
NEUTRAL_BAND = 0.1
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
FIQA_INSTRUCTION = (
    "What is the sentiment of this financial microblog post about {target}? Reply with negative, neutral, or positive."
)
HEADLINE_INSTRUCTION = (
    "What is the sentiment of this news headline about {company}? Reply with negative, neutral, or positive."
)


def score_label(score: float) -> str:
    """A [-1, 1] sentiment score as a label, by NEUTRAL_BAND."""
    return "neutral" if abs(score) <= NEUTRAL_BAND else "positive" if score > 0 else "negative"


def _fiqa_sa(path: Path) -> Iterator[tuple[int | None, Row]]:
    """FiQA 2018 task 1 posts: {id: {sentence, info: [{sentiment_score, target, ...}]}}; a post's score is the
    mean of its annotations (nearly all have one)."""
    data, _ = _parse_json(path, _read_text(path))
    if not isinstance(data, dict):
        raise DataError(path, None, None, "expected an object of FiQA posts keyed by id")
    for pid, post in data.items():
        info = post.get("info") if isinstance(post, dict) else None
        if not info or not isinstance(info, list):
            raise DataError(path, None, f"{pid}.info", "missing or empty")
        try:
            score = sum(float(i["sentiment_score"]) for i in info) / len(info)
        except (KeyError, TypeError, ValueError):
            raise DataError(path, None, f"{pid}.info.sentiment_score", "missing or not a number") from None
        yield None, {"id": f"fiqa-{pid}", "instruction": FIQA_INSTRUCTION.format(target=info[0].get("target", "")),
                     "input": post.get("sentence"), "output": score_label(score), "options": SENTIMENT_LABELS,
                     "score": score}  # fmt: skip


def _semeval17_headlines(path: Path) -> Iterator[tuple[int | None, Row]]:
    """SemEval-2017 task 5 headlines: [{id, company, title, sentiment}]; record ids are content ids."""
    data, lines = _parse_json(path, _read_text(path))
    if not isinstance(data, list):
        raise DataError(path, None, None, "expected a list of headlines")
    for i, row in enumerate(data):
        line = lines[i] if lines else None
        if not isinstance(row, dict) or not isinstance(row.get("sentiment"), int | float):
            raise DataError(path, line, f"[{i}].sentiment", "missing or not a number")
        # the file's ids repeat (its train and test parts were numbered apart): ids come from the content
        yield line, {"source_id": row.get("id"),
                     "instruction": HEADLINE_INSTRUCTION.format(company=row.get("company", "")),
                     "input": row.get("title"), "output": score_label(float(row["sentiment"])),
                     "options": SENTIMENT_LABELS, "score": row["sentiment"]}  # fmt: skip


# format name -> rows for the builder (registered in readers.READERS)
BENCHMARK_READERS: dict[str, Callable[[Path], Iterator[Located]]] = {
    "pubmedqa": lambda p: _pubmedqa(p, long=False),
    "pubmedqa-long": lambda p: _pubmedqa(p, long=True),
    "iob-ner": _iob_ner, "snli": _snli, "commonsenseqa": _commonsenseqa, "aqua": _aqua,
    "nq-open": _nq_open, "webquestions": _webquestions, "fpb": _fpb, "fiqa-sa": _fiqa_sa,
    "semeval17-headlines": _semeval17_headlines,
}  # fmt: skip
