"""Offline prefill in forwards of at most `generation.loop.FORWARD_TOKENS` tokens vs forwards as large as the
budget, side by side in one run, on eq. 2's workload: 16 Alpaca instructions, each with the k = 5 abstracts BM25
retrieves from the biomedical corpus in ../shared/data (80 contexts of mixed lengths), answered by
`generate_mixture` (64 tokens, EOS ignored), which admits the whole batch with a budget of all its prompt tokens.
Uncut, its length buckets are prefilled in forwards of up to ~13,000 tokens; cut, in column chunks of at most
`FORWARD_TOKENS`. Runs are interleaved (uncut, cut, uncut, ...) so that a change in the machine's speed slows both
alike; median of `--reps`. It also says whether the two give the same tokens (in bf16 they may not: a chunk
boundary changes where flash attention's blocks start, so it rounds differently; tests/generation/test_loop.py
checks fp32 tokens are exact).

    .venv/bin/python benchmarks/prefill_chunks.py [--items 16] [--k 5] [--new 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import SHARED, eq2_contexts

from specialize.generation import SamplingParams, generate_mixture
from specialize.generation import loop as loop_module
from specialize.models import load_model, select_precision

UNCUT = 10**12


def main() -> None:
    ap = argparse.ArgumentParser(description="offline prefill forwards cut to FORWARD_TOKENS vs uncut, eq. 2")
    for flag, default in (("--items", 16), ("--k", 5), ("--new", 64), ("--reps", 3), ("--threads", 2)):
        ap.add_argument(flag, type=int, default=default)
    args = ap.parse_args()
    precision = select_precision("auto", "cpu")
    model, tok = load_model("embedded", threads=args.threads, precision=precision)
    records = json.loads((SHARED / "generalist/alpaca_gpt4_sample/alpaca_en_demo.json").read_text())
    contexts = eq2_contexts(tok, records[: args.items], args.k)
    weights = [[1.0 / args.k] * args.k] * len(contexts)
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    cut = loop_module.FORWARD_TOKENS
    tokens = sum(len(c) for ctx in contexts for c in ctx)
    print(f"{len(contexts)} items x {args.k} contexts ({tokens} prompt tokens), {args.new} answer tokens each, "
          f"{precision.describe()} weights, {args.threads} threads")  # fmt: skip
    warm = params.model_copy(update={"max_new_tokens": 2})
    generate_mixture(model, tok, contexts[:1], weights[:1], warm, precision=precision)
    times: dict[int, list[float]] = {UNCUT: [], cut: []}
    outs = {}
    try:
        for _ in range(args.reps):
            for size in (UNCUT, cut):
                loop_module.FORWARD_TOKENS = size
                start = time.perf_counter()
                outs[size] = generate_mixture(model, tok, contexts, weights, params, precision=precision)
                times[size].append(time.perf_counter() - start)
    finally:
        loop_module.FORWARD_TOKENS = cut
    uncut_s, cut_s = statistics.median(times[UNCUT]), statistics.median(times[cut])
    same = sum(a.token_ids == b.token_ids for a, b in zip(outs[UNCUT], outs[cut], strict=True))
    ratio = uncut_s / cut_s
    print(f"eq. 2, forwards as large as the budget: {uncut_s:.1f} s; cut to {cut} tokens: {cut_s:.1f} s: "
          f"{ratio:.2f}x (median of {args.reps}; {same}/{len(contexts)} answers token-identical)")  # fmt: skip


if __name__ == "__main__":
    main()
