"""Decode steps over rows of very different lengths, side by side in one run: attention over the whole left-padded
width in one call per layer (one group: the plain decode forward, transformers' attention, as before groups) vs
rows grouped so that each group reads only the columns its longest row fills (`generation.ragged.column_groups`,
a ragged step).

For each case (one long row of L tokens among R - 1 short rows of S tokens, as a long request beside short ones
in the server; and eq. 2's rows of five retrieved documents of mixed lengths is its own case in
benchmarks/generation.py), two token loops on the embedded model, in the precision `auto` picks, decode the same
random prompts; their steps are interleaved (one group, grouped, one group, ...) so that a change in the machine's
memory bandwidth slows both alike. Median step time of `--steps` each, and whether the two give the same tokens
(in bf16 they may not: flash attention's column blocks start elsewhere, so it rounds differently; on random
prompts the logits are near ties. tests/generation/test_loop.py checks the groups' fp32 tokens are exact).

    .venv/bin/python benchmarks/attention_groups.py [--cases 1x3000+15x100,1x2000+63x200,4x1000+28x50]
                                                    [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specialize.generation import Request, SamplingParams, TokenLoop, ragged
from specialize.models import load_model, select_precision

ONE_GROUP = 10**12  # a call cost no split can repay


def parse(case: str) -> list[tuple[int, int]]:
    """'1x3000+15x100' -> [(1, 3000), (15, 100)]: (rows, prompt tokens) per part."""
    return [(int(n), int(t)) for n, t in (part.split("x") for part in case.split("+"))]


def loop_for(model, tok, precision, prompts: list[list[int]], steps: int) -> tuple[TokenLoop, list[Request]]:
    loop = TokenLoop(model, tok, precision, max_rows=len(prompts), prefill_tokens=1 << 20)
    params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
    requests = [Request([p], params) for p in prompts]
    loop.submit(*requests)
    while loop.rows is None or len(loop.running) < len(prompts):
        loop.step()
    return loop, requests


def timed_step(loop: TokenLoop, call_cost: int) -> float:
    ragged.CALL_COST = call_cost
    assert loop.rows is not None
    loop.rows._groups = None
    loop.rows.groups()  # regrouped under this cost outside the timing: the loop regroups only when rows change
    start = time.perf_counter()
    loop.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x3000+15x100,1x2000+63x200,4x1000+28x50")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model("embedded", threads=args.threads)
    precision = select_precision("auto", "cpu")
    default = ragged.CALL_COST
    for case in args.cases.split(","):
        gen = torch.Generator().manual_seed(len(case))
        prompts = [torch.randint(100, 40_000, (t,), generator=gen).tolist() for n, t in parse(case) for _ in range(n)]
        made = {name: loop_for(model, tok, precision, prompts, args.steps) for name in ("one group", "grouped")}
        loops = {name: loop for name, (loop, _) in made.items()}
        times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.steps):
            times["one group"].append(timed_step(loops["one group"], ONE_GROUP))
            times["grouped"].append(timed_step(loops["grouped"], default))
        groups = len(loops["grouped"].rows.groups())
        for loop in loops.values():
            loop.run()
        same = [r.result.token_ids for r in made["one group"][1]] == [r.result.token_ids for r in made["grouped"][1]]
        one, grouped = (statistics.median(times[n]) * 1000 for n in loops)
        print(f"{case} ({len(prompts)} rows, {precision.describe()}): one group {one:.1f} ms/step, "
              f"{groups} groups {grouped:.1f} ms/step: {one / grouped:.2f}x (same tokens: {same})")  # fmt: skip
    ragged.CALL_COST = default


if __name__ == "__main__":
    main()
