"""Inference weight layouts, side by side in one run: plain `F.linear` weights vs every linear packed alone in
oneDNN's blocked layout vs packed with q/k/v and gate/up sharing one concatenated matrix (`models.pack_linears`),
and the same shared packing in oneDNN's single-row block layout (batch-size hint 1) where the default layout for
the dtype differs (`models.PACK_HINT`).

Three copies of the embedded model in the precision `auto` picks on this CPU decode the same prompt; their decode
steps are interleaved (plain, packed, shared, plain, ...), so a change in the machine's memory bandwidth during
the run (other tenants of the host) slows all three alike, and the medians compare the layouts. Each copy
decodes greedily from its own logits, so the script also says whether the three produce the same tokens.

    .venv/bin/python benchmarks/weight_layout.py [--rows 1] [--steps 60]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from unittest import mock

import torch

from specialize import models
from specialize.models import cache_of, kv, load_model, pack_linears, select_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model("embedded", threads=args.threads)
    precision = select_precision("auto", "cpu")
    if not models.packing_applies(precision):
        raise SystemExit(f"nothing is packed for {precision.describe()} weights on this machine")
    variants = {"plain": model, "packed": copy.deepcopy(model), "packed, shared q/k/v + gate/up": copy.deepcopy(model)}
    with mock.patch.object(models, "SIBLINGS", ()):
        pack_linears(variants["packed"], precision)
    pack_linears(variants["packed, shared q/k/v + gate/up"], precision)
    if models.PACK_HINT.get(precision.param_dtype, 1) != 1:
        variants["shared, single-row layout"] = single = copy.deepcopy(model)
        with mock.patch.dict(models.PACK_HINT, {precision.param_dtype: 1}):
            pack_linears(single, precision)

    prompt = tok("Write a long story about a lighthouse keeper who lives alone on an island.")["input_ids"]
    ids = torch.tensor([prompt] * args.rows)
    state, times, tokens = {}, {name: [] for name in variants}, {name: [] for name in variants}
    with torch.inference_mode():
        for name, m in variants.items():
            out = m(input_ids=ids, use_cache=True)
            state[name] = (cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True))
        for _ in range(args.steps):
            for name, m in variants.items():
                cache, last = state[name]
                start = time.perf_counter()
                out = m(input_ids=last, use_cache=True, **kv(cache))
                times[name].append(time.perf_counter() - start)
                state[name] = (cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True))
                tokens[name].append(state[name][1])
    plain = statistics.median(times["plain"])
    print(f"decode step, {args.rows} row(s), {precision.describe()} weights, {args.steps} steps each, interleaved")
    for name, t in times.items():
        med = statistics.median(t)
        same = all(torch.equal(a, b) for a, b in zip(tokens[name], tokens["plain"], strict=True))
        print(f"  {name:32s} median {med * 1e3:7.1f} ms (min {min(t) * 1e3:7.1f}): {plain / med:.2f}x plain; "
              f"greedy tokens {'the same as' if same else 'DIFFERENT from'} plain")  # fmt: skip


if __name__ == "__main__":
    main()
