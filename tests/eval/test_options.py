"""Option scoring with a shared prefix equals scoring each (prompt, option) pair on its own."""

from __future__ import annotations

import pytest
import torch

from specialize.data import Example
from specialize.eval.loglik import response_logliks
from specialize.eval.options import MIN_SHARED_PREFIX, score_options, shared_prefix_length
from specialize.models import Precision
from specialize.prompts import AlpacaTemplate, encode_prompt, render_prompt

FP32 = Precision(torch.float32, None)
T = AlpacaTemplate()


def _check(model, tok, examples, options):
    prompts = [encode_prompt(render_prompt(e, T), T, tok) for e in examples]
    got = score_options(model, tok, prompts, options, batch_size=2, precision=FP32)
    for e, opts, scores in zip(examples, options, got, strict=True):
        ref = response_logliks(model, tok, [e] * len(opts), T, opts, precision=FP32)
        assert [s.option for s in scores] == opts
        for s, r in zip(scores, ref, strict=True):
            assert s.tokens == r.tokens
            assert s.logprob == pytest.approx(r.total, abs=1e-4)


def test_prefix_reuse_matches_independent_scoring(tiny_model, gpt2_style_tokenizer):
    examples = [
        Example(id="a", instruction="Classify the sentiment.", input="Great food!", output="positive"),
        Example(id="b", instruction="Why?", output="x"),
        Example(id="c", instruction="Pick one of the options for this longer question please.", output="y"),
    ]
    options = [["positive", "negative", "neutral"], ["Because the sky is blue.", "no"], ["a", "b", "c", "d", "e"]]
    _check(tiny_model, gpt2_style_tokenizer, examples, options)


def test_option_rows_split_over_passes_score_the_same(tiny_model, gpt2_style_tokenizer, monkeypatch):
    # a task with hundreds of options is scored in bounded passes, each on its own copy of the prefix cache
    import specialize.eval.options as options_module

    monkeypatch.setattr(options_module, "ROWS_PER_PASS", 3)
    examples = [
        Example(id="a", instruction="Name a feeling.", output="joy"),
        Example(id="b", instruction="Hm?", output="x"),
    ]
    options = [["joy", "anger", "a deep sadness", "fear", "surprise"], ["yes", "no, not at all", "maybe"]]
    _check(tiny_model, gpt2_style_tokenizer, examples, options)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each prompt keeps a token of its own
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


def test_task_definition_shared_by_the_batch_is_computed_once_and_scores_the_same(tiny_model, gpt2_style_tokenizer):
    # SuperNI-style: one long definition, inputs of different lengths -> a gap between prefix and left-padded rest
    definition = "In this task you are given a product review. Classify its sentiment as positive or negative. " * 2
    inputs = ["Great.", "It broke after two days and support never answered my emails.", "Fine, I guess?"]
    examples = [Example(id=str(i), instruction=definition, input=x, output="positive") for i, x in enumerate(inputs)]
    prompts = [encode_prompt(render_prompt(e, T), T, gpt2_style_tokenizer) for e in examples]
    assert shared_prefix_length(prompts) >= MIN_SHARED_PREFIX + 20
    _check(tiny_model, gpt2_style_tokenizer, examples, [["positive", "negative"]] * 3)


def test_embedded_model_boundary_tokens(embedded):
    """Prompts ending in a space and options starting with punctuation or a space: the joint text would
    merge tokens across the join; separate tokenization keeps the option's tokens intact and scorable."""
    model, tok = embedded
    e = Example(id="q", instruction="Answer with a word.", input="The capital of France is ", output="Paris")
    options = [["Paris", "  Paris", "\n\nParis", ".Paris", "París"]]
    _check(model, tok, [e], options)
    for option in ("  Paris", "\n\nParis"):  # the prompt's final newline merges with these in a joint encoding
        joint = tok(render_prompt(e, T) + option)["input_ids"]
        separate = encode_prompt(render_prompt(e, T), T, tok) + tok(option, add_special_tokens=False)["input_ids"]
        assert joint != separate


def test_empty_option_rejected(tiny_model, gpt2_style_tokenizer):
    with pytest.raises(ValueError, match="encodes to no tokens"):
        score_options(tiny_model, gpt2_style_tokenizer, [[1, 2, 3]], [["", "x"]])
