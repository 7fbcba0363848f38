"""The token loop's KV cache grows in place: a decode step writes its keys and values into room left in the
buffers instead of copying the whole cache, and anything the loop assigns to a layer is taken as the cache."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from specialize.generation import Request, SamplingParams, TokenLoop
from specialize.generation.kvcache import ROOM, GrowingLayer, growing, join_rows, keep_rows
from specialize.models import Precision

FP32 = Precision(torch.float32, None)


def _states(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g)


def test_appending_equals_concatenation_and_reuses_the_buffer_until_it_is_full():
    grown, plain = GrowingLayer(), DynamicLayer()
    k, v = _states(3, 10, 0)
    grown.update(k, v)
    plain.update(k, v)
    storage = grown.keys.untyped_storage().data_ptr()
    capacity = 10 + max(10 // 4, ROOM)
    reallocations = 0
    for step in range(capacity + 5):  # past the room: one reallocation, the content carried over
        k, v = _states(3, 1, step + 1)
        keys, values = grown.update(k, v)
        plain_keys, plain_values = plain.update(k, v)
        assert torch.equal(keys, plain_keys) and torch.equal(values, plain_values)
        assert keys.shape == (3, 2, 11 + step, 4) and grown.get_seq_length() == 11 + step
        if keys.untyped_storage().data_ptr() != storage:
            reallocations += 1
            storage = keys.untyped_storage().data_ptr()
            assert 10 + step + 1 > capacity  # only when the room ran out
    assert reallocations == 1


def test_tensors_the_loop_assigns_replace_the_buffer():
    """Keys and values assigned from outside (not by `update`) are taken as the cache."""
    layer = GrowingLayer()
    layer.update(*_states(3, 6, 0))
    layer.update(*_states(3, 1, 1))
    kept_keys, kept_values = layer.keys[[0, 2]], layer.values[[0, 2]]
    layer.keys, layer.values = kept_keys, kept_values
    k, v = _states(2, 1, 2)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, torch.cat([kept_keys, k], dim=2))
    assert torch.equal(values, torch.cat([kept_values, v], dim=2))


def _filled(rows: int, length: int, seed: int) -> GrowingLayer:
    layer = GrowingLayer()
    layer.update(*_states(rows, length, seed))
    return layer


def _grows_in_place(layer: GrowingLayer) -> None:
    """The next decode step appends into the layer's buffer and sees the cache it held before."""
    before_keys, before_values = layer.keys.clone(), layer.values.clone()
    storage = layer.keys.untyped_storage().data_ptr()
    k, v = _states(layer.keys.shape[0], 1, 99)
    keys, values = layer.update(k, v)
    assert keys.untyped_storage().data_ptr() == storage
    assert torch.equal(keys, torch.cat([before_keys, k], 2)) and torch.equal(values, torch.cat([before_values, v], 2))


def test_joining_groups_are_left_padded_into_one_buffer_that_grows_in_place():
    groups = [_filled(2, 5, 0), _filled(1, 9, 1), _filled(3, 7, 2)]
    parts = [(g.keys.clone(), g.values.clone()) for g in groups]
    join_rows(groups, 9)
    first = groups[0]
    assert first.keys.shape == (6, 2, 9, 4)
    row = 0
    for keys, values in parts:
        n, length = keys.shape[0], keys.shape[2]
        for mine, theirs in ((first.keys, keys), (first.values, values)):
            assert torch.equal(mine[row : row + n, :, 9 - length :], theirs)
            assert not mine[row : row + n, :, : 9 - length].any()  # zeros before, not uninitialized memory
        row += n
    _grows_in_place(first)


def test_joining_groups_can_be_put_in_any_row_order_in_the_same_copy():
    """Length buckets prefill a job's rows out of request order; the join puts them back."""
    plain = [_filled(2, 5, 0), _filled(1, 9, 1), _filled(3, 7, 2)]
    placed = [_filled(2, 5, 0), _filled(1, 9, 1), _filled(3, 7, 2)]
    join_rows(plain, 9)
    places = torch.tensor([4, 0, 5, 2, 1, 3])  # the j-th row (groups in order) goes to row places[j]
    join_rows(placed, 9, places)
    inverse = torch.argsort(places)
    assert torch.equal(placed[0].keys, plain[0].keys[inverse])
    assert torch.equal(placed[0].values, plain[0].values[inverse])
    _grows_in_place(placed[0])


def test_rows_that_stay_are_gathered_into_a_buffer_that_grows_in_place():
    layer = _filled(4, 8, 0)
    keys, values = layer.keys.clone(), layer.values.clone()
    keep_rows(layer, torch.tensor([3, 1]), 2)
    assert torch.equal(layer.keys, keys[[3, 1], :, 2:]) and torch.equal(layer.values, values[[3, 1], :, 2:])
    _grows_in_place(layer)
    plain = DynamicLayer()
    plain.update(keys, values)
    keep_rows(plain, torch.tensor([0, 2]), 0)  # any other layer kind: the rows indexed, nothing more
    assert torch.equal(plain.keys, keys[[0, 2]])


def test_growing_converts_only_full_attention_layers():
    cache = DynamicCache()
    cache.update(*_states(1, 2, 0), layer_idx=0)
    cache.update(*_states(1, 2, 1), layer_idx=1)
    sliding = type("Sliding", (DynamicLayer,), {})()  # another layer kind keeps its own update
    cache.layers.append(sliding)
    sliding.update(*_states(1, 2, 2))
    growing(cache)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, GrowingLayer, type(sliding)]


def test_decode_steps_write_into_the_cache_in_place(tiny_model, gpt2_style_tokenizer):
    """In the loop: after the prefill, decode steps keep every layer's buffer (no per-step copy of the cache),
    and the tokens are the ones decoded by transformers' `generate`."""
    tok = gpt2_style_tokenizer
    prompt = tok("The lighthouse keeper climbed the stairs")["input_ids"]
    request = Request([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=2)
    loop.submit(request)
    loop.step()  # prefill and the first decode step
    layers = loop.rows.cache.layers
    assert all(type(layer) is GrowingLayer for layer in layers)
    storages = [layer.keys.untyped_storage().data_ptr() for layer in layers]
    for _ in range(8):
        loop.step()
        assert [layer.keys.untyped_storage().data_ptr() for layer in layers] == storages
    loop.run()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       min_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)  # fmt: skip
    assert list(request.result.token_ids) == expected[0, ids.shape[1] :].tolist()
