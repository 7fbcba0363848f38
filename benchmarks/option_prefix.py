"""Option ranking with and without the batch-wide shared prefix (a SuperNI task's definition computed once per
batch), side by side in one process: same model, prompts, options, batch size and bf16 autocast.

    .venv/bin/python benchmarks/option_prefix.py [--tasks 4] [--limit 32] [--batch 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=4, help="the first N SuperNI sentiment tasks")
    ap.add_argument("--limit", type=int, default=32, help="instances per task")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import specialize.eval.options as options
    from specialize.eval.tasks import load_task_spec, load_tasks
    from specialize.models import load_model, select_precision
    from specialize.prompts import AlpacaTemplate, encode_prompt, render_prompt

    torch.set_num_threads(args.threads)
    model, tok = load_model("embedded", threads=args.threads)
    template = AlpacaTemplate()
    precision = select_precision("auto", "cpu")  # what `specialize eval` runs under
    spec = load_task_spec("superni_sentiment", str(SHARED), {"limit": args.limit})
    tasks = load_tasks(spec)[: args.tasks]
    work = [([encode_prompt(render_prompt(e, template), template, tok) for e in t.examples], t.options) for t in tasks]
    n = sum(len(p) for p, _ in work)
    tokens = sum(len(x) for p, _ in work for x in p)
    shared = [options.shared_prefix_length(p[: args.batch]) for p, _ in work]

    def run(min_shared: int) -> tuple[float, list[list[float]]]:
        options.MIN_SHARED_PREFIX = min_shared
        start = time.perf_counter()
        scores = [[s.logprob for s in row] for prompts, opts in work
                  for row in options.score_options(model, tok, prompts, [opts] * len(prompts), batch_size=args.batch,
                                                   precision=precision)
                  ]  # fmt: skip
        return time.perf_counter() - start, scores

    default = options.MIN_SHARED_PREFIX
    run(default)  # warm-up
    plain_s, plain = run(10**9)
    shared_s, with_prefix = run(default)
    diff = max(abs(a - b) for r, q in zip(plain, with_prefix, strict=True) for a, b in zip(r, q, strict=True))
    same = sum(r.index(max(r)) == q.index(max(q)) for r, q in zip(plain, with_prefix, strict=True))
    print(f"{len(tasks)} tasks, {n} prompts, {tokens / n:.0f} prompt tokens on average, shared prefix per first "
          f"batch {shared}; batch {args.batch}, {args.threads} threads")  # fmt: skip
    print(f"no prefix sharing: {plain_s:.2f} s ({n / plain_s:.1f} prompts/s)")
    print(f"shared prefix    : {shared_s:.2f} s ({n / shared_s:.1f} prompts/s)")
    print(f"speed-up {plain_s / shared_s:.2f}x; max |log-likelihood difference| {diff:.4f} (bf16 autocast); "
          f"same top option for {same}/{n} prompts")  # fmt: skip


if __name__ == "__main__":
    main()
