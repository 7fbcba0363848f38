"""The compiled decode step of a lone row (generation/compiled.py): the same tokens as the eager step, across
buffer reallocations, and only where it applies. Each test compiles a tiny model (tens of seconds)."""

from __future__ import annotations

import pytest
import torch

from specialize.generation import Request, SamplingParams, TokenLoop, compiled, kvcache
from specialize.models import Precision

FP32 = Precision(torch.float32, None)
LONG = SamplingParams(max_new_tokens=40, ignore_eos=True)


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def _decode(loop: TokenLoop, requests: list[Request]) -> list[tuple[int, ...]]:
    loop.submit(*requests)
    loop.run()
    return [r.result.token_ids for r in requests]


def test_a_lone_row_decodes_compiled_to_the_tokens_of_the_eager_step(tiny_model, gpt2_style_tokenizer, monkeypatch):
    tok = gpt2_style_tokenizer
    prompt = _ids(tok, "The lighthouse keeper climbed the stairs")
    [want] = _decode(TokenLoop(tiny_model, tok, FP32), [Request([prompt], LONG)])
    # two positions of room: the row's buffers are reallocated many times while it decodes, so the graph runs over
    # caches of many lengths and capacities
    monkeypatch.setattr(kvcache, "ROOM", 2)
    loop = TokenLoop(tiny_model, tok, FP32, compile_decode=True)
    [got] = _decode(loop, [Request([prompt], LONG)])
    assert loop.compiled is not None and loop.compiled.error is None
    assert got == want
    assert loop.stats["compiled_steps"] == LONG.max_new_tokens - 1  # every decode step (the first token: prefill)


def test_only_a_lone_unpadded_row_of_a_plain_model_runs_compiled(tiny_model, gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    short = Request([_ids(tok, "Hi")], SamplingParams(max_new_tokens=4, ignore_eos=True))
    long = Request([_ids(tok, "Once upon a time, far away")], SamplingParams(max_new_tokens=30, ignore_eos=True))
    want = [_decode(TokenLoop(tiny_model, tok, FP32), [Request(r.contexts, r.params)])[0] for r in (short, long)]
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=4, compile_decode=True)
    assert _decode(loop, [short, long]) == want
    # two rows step eagerly (3 steps after the first token); once the short one leaves, the long row is alone,
    # its padding columns dropped, and steps compiled
    assert loop.stats["compiled_steps"] == long.params.max_new_tokens - short.params.max_new_tokens
    layers = [kvcache.GrowingLayer()]
    assert not compiled.CompiledDecode.applies(tiny_model, layers, 2, False, [None, None])
    assert not compiled.CompiledDecode.applies(tiny_model, layers, 1, True, [None])
    assert not compiled.CompiledDecode.applies(tiny_model, layers, 1, False, ["specialist"])
    assert compiled.CompiledDecode.applies(tiny_model, layers, 1, False, [None])


def test_a_failed_compile_says_so_and_decodes_eagerly(tiny_model, gpt2_style_tokenizer, monkeypatch, capsys):
    tok = gpt2_style_tokenizer
    prompt = _ids(tok, "A short story")
    [want] = _decode(TokenLoop(tiny_model, tok, FP32), [Request([prompt], LONG)])
    broken = compiled.CompiledDecode(tiny_model)

    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(broken, "_fn", fail)
    monkeypatch.setattr(compiled, "for_model", lambda model: broken)
    loop = TokenLoop(tiny_model, tok, FP32, compile_decode=True)
    [got] = _decode(loop, [Request([prompt], LONG)])
    assert got == want and loop.stats["compiled_steps"] == 0
    assert broken.error == "RuntimeError: no C++ compiler found"
    assert capsys.readouterr().err.count("compiled decoding unavailable") == 1


@pytest.mark.parametrize("n", [1, 3])
def test_reserve_keeps_the_cache_and_grew_extends_it(n):
    layer = kvcache.GrowingLayer()
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    layer.update(k, v)
    new_k, new_v = torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)
    keys, values, length = layer.reserve(new_k, new_v)
    assert length == 5 and keys.shape[2] >= 5 + n
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)  # nothing written yet
    keys[:, :, 5 : 5 + n], values[:, :, 5 : 5 + n] = new_k, new_v
    layer.grew(n)
    assert torch.equal(layer.keys, torch.cat([k, new_k], 2)) and torch.equal(layer.values, torch.cat([v, new_v], 2))
    layer.update(k[:, :, :1], v[:, :, :1])  # an eager update goes on after it
    assert layer.keys.shape[2] == 6 + n and torch.equal(layer.keys[:, :, -1:], k[:, :, :1])
