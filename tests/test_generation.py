"""Batched generation: identical to one-at-a-time greedy, honest finish reasons, stop strings."""

from __future__ import annotations

import torch

from specialize.generation import SamplingParams, generate
from specialize.models import Precision
from specialize.prompts import AlpacaTemplate

FP32 = Precision(torch.float32, None)
ALPACA = AlpacaTemplate()


def test_batched_greedy_equals_one_by_one(tiny_model, gpt2_style_tokenizer):
    prompts = [ALPACA.render(q) for q in ("Hi.", "Classify the sentiment of this long review please.", "Why?")]
    params = SamplingParams(max_new_tokens=12)
    batched = generate(tiny_model, gpt2_style_tokenizer, prompts, ALPACA, params, batch_size=3, precision=FP32)
    single = [generate(tiny_model, gpt2_style_tokenizer, [p], ALPACA, params, precision=FP32)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]


def test_finish_reason_and_length(tiny_model, gpt2_style_tokenizer):
    out = generate(tiny_model, gpt2_style_tokenizer, [ALPACA.render("Go.")] * 2, ALPACA,
                   SamplingParams(max_new_tokens=5), precision=FP32)  # fmt: skip
    for c in out:
        eos = gpt2_style_tokenizer.eos_token_id
        assert eos not in c.token_ids
        assert (c.finish_reason == "length") == (len(c.token_ids) == 5)


def test_sampling_is_reproducible_with_seed(tiny_model, gpt2_style_tokenizer):
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.98, seed=7)
    a = generate(tiny_model, gpt2_style_tokenizer, [ALPACA.render("Go.")], ALPACA, p, precision=FP32)
    b = generate(tiny_model, gpt2_style_tokenizer, [ALPACA.render("Go.")], ALPACA, p, precision=FP32)
    assert a == b


def test_embedded_answers_a_factual_question(embedded):
    model, tok = embedded
    prompt = ALPACA.render("What is the capital of France? Answer in one word.")
    [c] = generate(model, tok, [prompt], ALPACA, SamplingParams(max_new_tokens=16))
    assert "Paris" in c.text
    assert c.finish_reason == "stop"


def test_stop_string_cuts_text(embedded):
    model, tok = embedded
    prompt = ALPACA.render("List three fruits, one per line.")
    [full] = generate(model, tok, [prompt], ALPACA, SamplingParams(max_new_tokens=30))
    [cut] = generate(model, tok, [prompt], ALPACA, SamplingParams(max_new_tokens=30, stop=("\n",)))
    assert "\n" in full.text.strip()
    assert cut.text == full.text[: full.text.index("\n")]
    assert cut.finish_reason == "stop"
