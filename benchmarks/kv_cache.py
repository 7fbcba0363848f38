"""The token loop's KV cache, side by side in one run: transformers' `DynamicLayer` (a `torch.cat` of the whole
layer cache every decode step) vs `generation.kvcache.GrowingLayer` (a buffer with room, written in place).

For each (rows, context) case the embedded model, in the precision `auto` picks and with the loop's packed
weights, prefills random token ids once; the cache is copied, one copy left as transformers makes it and one
converted with `kvcache.growing`. Their decode steps are interleaved (concatenating, growing, concatenating, ...)
so that a change in the machine's memory bandwidth during the run slows both alike, and each decodes greedily
from its own logits, so the script also says whether the two give the same tokens.

Then rows joining and leaving (`--joins`): the cache work of one row joining a running batch of R rows over T
columns, and of one row leaving it, up to and including the next decode step's write, on caches of the embedded
model's shape. The previous way (each joining group left-padded, then concatenated; the rows kept indexed; the
next `update` then copying the result into a buffer with room) vs `kvcache.join_rows` / `keep_rows` (one copy
into a buffer with room, which the next `update` writes into), interleaved, median of `--reps`.

    .venv/bin/python benchmarks/kv_cache.py [--cases 1x3000,8x1024,8x3000,60x400] [--steps 16]
                                            [--joins 16x1000,60x400] [--reps 9]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from specialize.generation.kvcache import GrowingLayer, growing, join_rows, keep_rows
from specialize.models import cache_of, inference_mode, kv, load_model, pack_linears, select_precision


def case(model, precision, rows: int, context: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(rows * 100_003 + context)
    ids = torch.randint(100, 40_000, (rows, context), generator=gen)
    with inference_mode(model, precision):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        cat_cache = cache_of(out)
        variants = {"concatenating (transformers)": cat_cache, "growing in place": growing(copy.deepcopy(cat_cache))}
        state = {name: first for name in variants}
        times = {name: [] for name in variants}
        tokens = {name: [] for name in variants}
        mask = torch.ones(rows, context, dtype=torch.long)
        for i in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            step = {"attention_mask": mask, "position_ids": torch.full((rows, 1), context + i), "use_cache": True}
            for name, cache in variants.items():
                start = time.perf_counter()
                out = model(input_ids=state[name], **step, **kv(cache))
                times[name].append(time.perf_counter() - start)
                state[name] = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens[name].append(state[name])
    names = list(variants)
    base = statistics.median(times[names[0]])
    print(f"{rows} row(s) over {context} tokens of context, {steps} decode steps each, interleaved")
    for name in names:
        med = statistics.median(times[name])
        same = all(torch.equal(a, b) for a, b in zip(tokens[name], tokens[names[0]], strict=True))
        print(f"  {name:30s} median {med * 1e3:7.1f} ms (min {min(times[name]) * 1e3:7.1f}): {base / med:.2f}x "
              f"concatenating; greedy tokens {'the same' if same else 'DIFFERENT'}", flush=True)  # fmt: skip


def _layers(model, rows: int, context: int, dtype: torch.dtype) -> list[GrowingLayer]:
    """A cache of the model's shape (every layer's keys and values random), grown in place as in the loop."""
    cfg = model.config
    heads, dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = []
    for _ in range(cfg.num_hidden_layers):
        layer = GrowingLayer()
        layer.update(*(torch.randn(rows, heads, context, dim, dtype=dtype) for _ in range(2)))
        layers.append(layer)
    return layers


def _step(layers: list[GrowingLayer]) -> None:
    """What the next decode step writes: one position per row."""
    for la in layers:
        la.update(*(la.keys.new_zeros((la.keys.shape[0], la.keys.shape[1], 1, la.keys.shape[3])) for _ in range(2)))


def _join_before(layers: list[GrowingLayer], new: list[GrowingLayer]) -> None:
    for la, nl in zip(layers, new, strict=True):
        for name in ("keys", "values"):
            t, n = getattr(la, name), getattr(nl, name)
            n = torch.cat([n.new_zeros((*n.shape[:2], t.shape[2] - n.shape[2], n.shape[3])), n], dim=2)
            setattr(la, name, torch.cat([t, n]))


def membership(model, dtype: torch.dtype, rows: int, context: int, reps: int) -> None:
    times: dict[str, list[float]] = {"join, before": [], "join, now": [], "leave, before": [], "leave, now": []}
    for _ in range(reps):
        for how in ("before", "now"):
            batch, joining = _layers(model, rows, context, dtype), _layers(model, 1, context // 2, dtype)
            start = time.perf_counter()
            if how == "before":
                _join_before(batch, joining)
            else:
                for la, nl in zip(batch, joining, strict=True):
                    join_rows([la, nl], context)
            _step(batch)
            times[f"join, {how}"].append(time.perf_counter() - start)
            index = torch.arange(1, rows + 1)  # the first row leaves
            start = time.perf_counter()
            for la in batch:
                if how == "before":
                    la.keys, la.values = la.keys[index], la.values[index]
                else:
                    keep_rows(la, index, 0)
            _step(batch)
            times[f"leave, {how}"].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{rows} row(s) over {context} columns, a row of {context // 2} tokens joining, then one leaving "
          f"(cache work up to the next step's write, median of {reps}):")  # fmt: skip
    for event in ("join", "leave"):
        before, now = med[f"{event}, before"], med[f"{event}, now"]
        print(f"  {event:5s}: before {before * 1e3:6.1f} ms, now {now * 1e3:6.1f} ms: {before / now:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x3000,8x1024,8x3000,60x400", help="rows x context tokens, comma-separated")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--joins", default="16x1000,60x400", help="rows x columns of the batch rows join and leave")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_model("embedded", threads=args.threads)
    precision = select_precision("auto", "cpu")
    pack_linears(model, precision)  # as the token loop runs it: the cache's share of a step is what is compared
    print(f"embedded model, {precision.describe()} weights")
    for spec in filter(None, args.cases.split(",")):
        rows, context = (int(x) for x in spec.lower().split("x"))
        case(model, precision, rows, context, args.steps)
    dtype = precision.autocast_dtype or precision.param_dtype
    for spec in filter(None, args.joins.split(",")):
        rows, context = (int(x) for x in spec.lower().split("x"))
        membership(model, dtype, rows, context, args.reps)


if __name__ == "__main__":
    main()
