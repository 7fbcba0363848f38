"""Metrics against hand-computed cases, and parity with the SuperNI official scoring path."""

from __future__ import annotations

import gzip
import json
import random
import string
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from specialize.eval.metrics import accuracy, entity_f1, exact_match, normalize_answer, rouge_l, token_f1


def test_rouge_l_hand_computed():
    # LCS of [the cat sat on the mat] and [the cat is on the mat] is 5 tokens: P = R = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    assert rouge_l("Cats running", ["cat runs"]) == pytest.approx(100.0)  # Porter stemming
    assert rouge_l("anything", ["nothing alike", "anything"]) == 100.0  # max over references
    assert rouge_l("", ["x"]) == 0.0


def test_exact_match_variants():
    assert exact_match("The Cat!", ["cat"]) == 100.0  # SQuAD drops articles and punctuation
    assert exact_match("The Cat!", ["cat"], remove_articles=False) == 0.0  # SuperNI keeps articles
    assert exact_match("the cat", ["The cat."], remove_articles=False) == 100.0
    assert normalize_answer("  An  apple, a day ") == "apple day"


def test_token_f1_hand_computed():
    # [quick brown fox] vs [quick fox jumps]: 2 common, P = R = 2/3
    assert token_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(100 * 2 / 3)
    assert token_f1("Paris", ["London", "paris"]) == 100.0
    assert token_f1("", [""]) == 100.0 and token_f1("x", [""]) == 0.0


def test_entity_f1_and_accuracy():
    assert entity_f1("a, b, c", ["b, c, d"]) == pytest.approx(100 * 2 / 3)
    assert entity_f1("None", ["None"]) == 100.0
    assert entity_f1("Breast Cancer ,  ataxia", ["ataxia, breast cancer"]) == 100.0
    assert entity_f1("x", ["None"]) == 0.0
    assert accuracy("positive", ["positive"]) == 100.0 and accuracy("Positive", ["positive"]) == 0.0


def test_metrics_need_references():
    with pytest.raises(ValueError):
        rouge_l("x", [])


# ----------------------------------------------------------------------------- parity with the official path


def _official_compute_metrics(predictions, references):
    """The SuperNI scorer's code path (eval/automatic/evaluation.py, default track), re-run step by step:
    rouge-score rougeL with stemming, SQuAD normalization without article removal, max over references,
    mean x 100."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def norm(s):
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        return " ".join(s.split())

    em = rouge = 0.0
    for pred, gold in zip(predictions, references, strict=True):
        em += max(float(norm(pred) == norm(g)) for g in gold)
        rouge += max(scorer.score(prediction=pred, target=g)["rougeL"].fmeasure for g in gold)
    return {"exact_match": 100.0 * em / len(references), "rougeL": 100.0 * rouge / len(references)}


def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    choice = rng.randrange(6)
    if choice == 0:
        return text
    if choice == 1:
        return " ".join(words[: max(1, len(words) // 2)])
    if choice == 2:
        rng.shuffle(words)
        return " ".join(words)
    if choice == 3:
        return text.upper() + " !!"
    if choice == 4:
        return "Ünïcödé 東京 " + text + " café"
    return ""


def test_parity_with_official_superni_scoring(shared_data: Path):
    rng = random.Random(0)
    preds, refs = [], []
    files = sorted((shared_data / "superni/tasks").glob("*.json.gz"))[:40]
    for f in files:
        task = json.loads(gzip.decompress(f.read_bytes()))
        for inst in task["Instances"][:10]:
            refs.append(inst["output"])
            preds.append(_perturb(rng.choice(inst["output"]), rng))
    assert len(preds) == 400 and any(len(r) > 1 for r in refs)
    official = _official_compute_metrics(preds, refs)
    ours_rouge = sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds)
    ours_em = sum(exact_match(p, r, remove_articles=False) for p, r in zip(preds, refs, strict=True)) / len(preds)
    assert abs(ours_rouge - official["rougeL"]) < 1e-9
    assert abs(ours_em - official["exact_match"]) < 1e-9
    assert 0 < ours_em < 100 and 0 < ours_rouge < 100  # the perturbations exercise both ends
