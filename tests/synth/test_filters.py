"""The ROUGE-L filter keeps exactly what rouge-score pairwise keeps, while skipping most LCS computations."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rouge_score import rouge_scorer

from specialize.synth.filters import RougePool, heuristic_reject


def _stream(shared: Path, n: int) -> list[str]:
    seeds = [json.loads(x)["instruction"] for x in (shared / "generalist/self_instruct_seed/seed_tasks.jsonl").open()]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = rng.choice(seeds).split()
        op = rng.randrange(4)
        if op == 1:  # near-duplicate: drop a word
            words.pop(rng.randrange(len(words)))
        elif op == 2:  # swap in words from another instruction
            other = rng.choice(seeds).split()
            words = words[: len(words) // 2] + other[len(other) // 2 :]
        elif op == 3:
            rng.shuffle(words)
        out.append(" ".join(words))
    return out


def test_kept_set_identical_to_pairwise_rouge_score(shared_data: Path):
    stream = _stream(shared_data, 600)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_ref: list[str] = []
    for s in stream:
        if all(scorer.score(s, k)["rougeL"].fmeasure < 0.7 for k in kept_ref):
            kept_ref.append(s)
    pool = RougePool(0.7)
    kept = [s for s in stream if pool.offer(s)]
    assert kept == kept_ref
    assert 20 < len(kept) < len(stream)  # the stream exercises both decisions
    pairs = sum(range(len(kept)))
    assert pool.lcs_computed < pairs / 3  # the bound prunes most pairs


def test_heuristics():
    assert heuristic_reject("Hi there") == "too_short"
    assert heuristic_reject("Draw a diagram of the heart please") == "blacklisted_word"
    assert heuristic_reject("- Describe the function of insulin") == "leading_punctuation"
    assert heuristic_reject("Écrivez la fonction de l'insuline") == "non_english_start"
    assert heuristic_reject("Describe the function of insulin in the body.") is None
    assert heuristic_reject(" ".join(["word"] * 151)) == "too_long"


def test_stats_funnel_is_in_pipeline_order_and_verbs_skip_lead_words():
    from specialize.synth.stats import funnel, verb_object

    counts = {"kept": 5, "parsed": 9, "beyond_target": 2, "parse_no_input": 1, "rejected_too_short": 1,
              "rejected_rouge_near_duplicate": 2, "rejected_exact_duplicate": 1,
              "rejected_empty_response": 1}  # fmt: skip
    steps = funnel(counts, 4)
    names = [s for s, _ in steps]
    assert names == ["generated", "parse_no_input", "beyond_target", "parsed", "rejected_too_short",
                     "rejected_exact_duplicate", "rejected_rouge_near_duplicate", "kept", "rejected_empty_response",
                     "final examples"]  # fmt: skip
    assert dict(steps)["generated"] == 1 + 9 + 2 and dict(steps)["final examples"] == 4
    for text, verb in [
        ("To classify the abstract, read it.", "classify"),
        ("Your task is to list genes.", "list"),
        ("In this task, you need to summarize the text.", "summarize"),
        ("Please name a drug.", "name"),
    ]:
        assert verb_object(text)[0] == verb
