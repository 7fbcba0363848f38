"""The token loop's KV cache, side by side in one run: transformers' `DynamicLayer` (a `torch.cat` of the whole
layer cache every decode step) vs `generation.kvcache.GrowingLayer` (a buffer with room, written in place).

For each (rows, context) case the embedded model, in the precision `auto` picks and with the loop's packed
weights, prefills random token ids once; the cache is copied, one copy left as transformers makes it and one
converted with `kvcache.growing`. Their decode steps are interleaved (concatenating, growing, concatenating, ...)
so that a change in the machine's memory bandwidth during the run slows both alike, and each decodes greedily
from its own logits, so the script also says whether the two give the same tokens.

    .venv/bin/python benchmarks/kv_cache.py [--cases 1x3000,8x1024,8x3000,60x400] [--steps 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from specialize.generation.kvcache import growing
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x3000,8x1024,8x3000,60x400", help="rows x context tokens, comma-separated")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_model("embedded", threads=args.threads)
    precision = select_precision("auto", "cpu")
    pack_linears(model, precision)  # as the token loop runs it: the cache's share of a step is what is compared
    print(f"embedded model, {precision.describe()} weights")
    for spec in args.cases.split(","):
        rows, context = (int(x) for x in spec.lower().split("x"))
        case(model, precision, rows, context, args.steps)


if __name__ == "__main__":
    main()
