"""The KV cache of the token loop's running rows: transformers' `DynamicCache`, its full-attention layers made to
grow in place.

transformers' `DynamicLayer.update` appends a step's keys and values with `torch.cat`, which copies the whole
cache of the layer on every decode step, into a fresh allocation: past glibc's mmap threshold each one is new
pages that fault on first touch. At 8 rows over a 3,000-token context that copy was more than half of a decode
step on a 2-core CPU (docs/benchmarks.md, "KV cache grown in place"). `GrowingLayer` keeps each layer's keys and
values in a buffer with room for more tokens and writes a step's into it in place; what attention reads is a view
of the filled part. Reallocation happens only when the room runs out (by a quarter of the length, at least `ROOM`
tokens), when rows join or leave (`join_rows`, `keep_rows`: one copy into new buffers with room), or when
something else has assigned the layer new tensors (the next `update` copies them into a new buffer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

ROOM = 64  # tokens of room at least, so that a short decode reallocates a few times, not every step


def cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise TypeError(f"the token loop needs a DynamicCache of key/value layers, got {type(cache).__name__}")
    return layers


def join_rows(layers: Sequence[Any], width: int, places: torch.Tensor | None = None) -> None:
    """Make `layers[0]` hold the rows of all `layers` (one cache layer of each group of rows joining a batch), each
    group's positions right-aligned over `width` columns and the columns before them zeros. `places[j]`: where the
    j-th of the groups' rows, counted in order, goes (default: where it comes). One new tensor per keys and values,
    with room to grow when `layers[0]` grows in place: a join costs one copy of the cache, however many groups join,
    whatever their widths and order."""
    first = layers[0]
    capacity = _capacity(width) if isinstance(first, GrowingLayer) else width
    out = []
    for parts in ([la.keys for la in layers], [la.values for la in layers]):
        dest = parts[0].new_empty((sum(p.shape[0] for p in parts), parts[0].shape[1], capacity, parts[0].shape[3]))
        row = 0
        for p in parts:
            pad, n = width - p.shape[2], p.shape[0]
            if places is None:
                dest[row : row + n, :, :pad].zero_()  # padding columns: masked, but never NaN garbage
                dest[row : row + n, :, pad:width] = p
            else:
                dest[:, :, :pad].index_fill_(0, places[row : row + n], 0)
                dest[:, :, pad:width].index_copy_(0, places[row : row + n], p)
            row += n
        out.append(dest)
    _hold(first, out[0], out[1], width)


def keep_rows(layer: Any, index: torch.Tensor, start: int) -> None:
    """Only the rows at `index`, from column `start` on: one gather into a new tensor (with room to grow when the
    layer grows in place)."""
    width = layer.keys.shape[2] - start
    if not isinstance(layer, GrowingLayer):
        layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        return
    capacity = _capacity(width)
    keys, values = (t.new_empty((len(index), t.shape[1], capacity, t.shape[3])) for t in (layer.keys, layer.values))
    torch.index_select(layer.keys[:, :, start:], 0, index, out=keys[:, :, :width])
    torch.index_select(layer.values[:, :, start:], 0, index, out=values[:, :, :width])
    _hold(layer, keys, values, width)


def _capacity(length: int) -> int:
    return length + max(length // 4, ROOM)


def _hold(layer: Any, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
    """Give `layer` buffers whose first `length` positions are its cache (a `GrowingLayer` writes on after them)."""
    layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
    if isinstance(layer, GrowingLayer):
        layer._key_buffer, layer._value_buffer = keys, values
        layer._views = (layer.keys, layer.values)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into a buffer with room instead of concatenating. `keys`/`values`
    stay plain tensors of shape [rows, heads, length, head_dim] (views of the buffers), so everything that reads
    or replaces them as a `DynamicLayer`'s works unchanged."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    _views: tuple[torch.Tensor, torch.Tensor] | None = None  # what the last update returned

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values, length = self.reserve(key_states, value_states)
        end = length + key_states.shape[-2]
        keys[:, :, length:end] = key_states
        values[:, :, length:end] = value_states
        _hold(self, keys, values, end)
        return self.keys, self.values

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(key buffer, value buffer, length): buffers holding the cache in their first `length` positions, with
        room after them for the positions of `key_states`/`value_states` (reallocated when there is none)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # the buffers hold the cache only while nothing replaced the views the last update returned
        ours = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if not ours or self._key_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = _capacity(end)
            self._key_buffer = _buffer(self.keys, length, key_states, capacity)
            self._value_buffer = _buffer(self.values, length, value_states, capacity)
            _hold(self, self._key_buffer, self._value_buffer, length)
        assert self._key_buffer is not None and self._value_buffer is not None
        return self._key_buffer, self._value_buffer, length

    def grew(self, n: int) -> None:
        """Something else wrote `n` positions into the buffers after the cache (`reserve`d): they are cache now."""
        assert self._key_buffer is not None and self._value_buffer is not None
        _hold(self, self._key_buffer, self._value_buffer, self.keys.shape[-2] + n)


def _buffer(current: torch.Tensor, length: int, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """Room for `capacity` positions of `new`'s rows, heads and head size, the first `length` copied from
    `current`."""
    buffer = new.new_empty((new.shape[0], new.shape[1], capacity, new.shape[3]))
    if length:
        buffer[:, :, :length] = current
    return buffer


def growing(cache: Any) -> Any:
    """`cache` with its full-attention `DynamicLayer`s growing in place (sliding-window and other layer kinds
    keep their own update); returns it."""
    for layer in cache_layers(cache):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
    return cache
