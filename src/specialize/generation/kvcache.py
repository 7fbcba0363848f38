"""The KV cache of the token loop's running rows: transformers' `DynamicCache`, its full-attention layers made to
grow in place.

transformers' `DynamicLayer.update` appends a step's keys and values with `torch.cat`, which copies the whole
cache of the layer on every decode step, into a fresh allocation: past glibc's mmap threshold each one is new
pages that fault on first touch. At 8 rows over a 3,000-token context that copy was more than half of a decode
step on a 2-core CPU (docs/benchmarks.md, "KV cache grown in place"). `GrowingLayer` keeps each layer's keys and
values in a buffer with room for more tokens and writes a step's into it in place; what attention reads is a view
of the filled part. Reallocation happens only when the room runs out (by a quarter of the length, at least `ROOM`
tokens) or when the loop has replaced the tensors (rows joining, leaving or padded: `merge`, `keep` and
`pad_left` assign new ones, which the next `update` copies into a new buffer)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

ROOM = 64  # tokens of room at least, so that a short decode reallocates a few times, not every step


def cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise TypeError(f"the token loop needs a DynamicCache of key/value layers, got {type(cache).__name__}")
    return layers


def pad_left(cache: Any, width: int) -> None:
    """Left-pad every layer's keys and values with zeros to `width` positions."""
    for layer in cache_layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if t.shape[2] < width:
                pad = t.new_zeros((*t.shape[:2], width - t.shape[2], t.shape[3]))
                setattr(layer, name, torch.cat([pad, t], dim=2))


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into a buffer with room instead of concatenating. `keys`/`values`
    stay plain tensors of shape [rows, heads, length, head_dim] (views of the buffers), so everything that reads
    or replaces them as a `DynamicLayer`'s works unchanged."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    _views: tuple[torch.Tensor, torch.Tensor] | None = None  # what the last update returned

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # the buffers hold the cache only while nothing replaced the views the last update returned
        ours = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if not ours or self._key_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = end + max(end // 4, ROOM)
            self._key_buffer = _buffer(self.keys, length, key_states, capacity)
            self._value_buffer = _buffer(self.values, length, value_states, capacity)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        self._views = (self.keys, self.values)
        return self.keys, self.values


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
