"""Multiple-choice scoring: `specialize eval` option ranking vs lm-evaluation-harness (HF backend), side by side.

Same model (embedded SmolLM2-135M, already loaded once and shared), same examples (CommonsenseQA dev),
same rendered Alpaca prompts and options, same batch size, both under the same bf16 autocast. lm-eval gets
the prompt as its context and each option as a continuation with an empty target delimiter, so both score
log p(option | prompt); they differ in tokenization at the join (lm-eval encodes context + continuation
together and splits; specialize encodes them separately) and in prefix reuse.

    .venv/bin/python benchmarks/eval_options.py [--limit 200] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TASK_YAML = """\
task: specialize_bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="both in float32 (isolates bf16 rounding from the method)")
    args = ap.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from specialize.eval.metrics import accuracy
    from specialize.eval.options import score_options
    from specialize.eval.tasks import load_task_spec, load_tasks
    from specialize.models import Precision, load_model
    from specialize.prompts import AlpacaTemplate, encode_prompt, render_prompt

    torch.set_num_threads(args.threads)
    model, tok = load_model("embedded", threads=args.threads)
    precision = Precision(torch.float32, None if args.fp32 else torch.bfloat16)
    [task] = load_tasks(load_task_spec("commonsenseqa", str(SHARED), {"limit": args.limit}))
    t = AlpacaTemplate()
    prompts = [render_prompt(e, t) for e in task.examples]
    options = [list(e.options or ()) for e in task.examples]

    start = time.perf_counter()
    ids = [encode_prompt(p, t, tok) for p in prompts]
    scored = score_options(model, tok, ids, options, batch_size=args.batch, precision=precision)
    ours_s = time.perf_counter() - start
    preds = [max(s, key=lambda o: o.logprob).option for s in scored]
    preds_norm = [max(s, key=lambda o: o.per_char).option for s in scored]
    ours_acc = sum(accuracy(p, list(e.references)) for p, e in zip(preds, task.examples, strict=True)) / len(preds)
    ours_norm = sum(accuracy(p, list(e.references)) for p, e in zip(preds_norm, task.examples, strict=True)) / len(
        preds
    )

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "mc.jsonl"
        with data.open("w") as f:
            for p, e, opts in zip(prompts, task.examples, options, strict=True):
                f.write(json.dumps({"prompt": p, "choices": opts, "gold": opts.index(e.output)}) + "\n")
        (Path(d) / "task.yaml").write_text(TASK_YAML.format(data=data))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            out = simple_evaluate(model=lm, tasks=["specialize_bench_mc"], task_manager=TaskManager(include_path=d),
                                  log_samples=False)  # fmt: skip
        theirs_s = time.perf_counter() - start
    res = out["results"]["specialize_bench_mc"]
    theirs_acc, theirs_norm = 100 * res["acc,none"], 100 * res["acc_norm,none"]
    n = len(prompts)
    mode = "float32" if args.fp32 else "bf16 autocast"
    print(f"CommonsenseQA dev, {n} examples x 5 options, batch {args.batch}, {args.threads} threads, {mode}")
    print(f"specialize: {n / ours_s:6.2f} ex/s  acc {ours_acc:.2f}  acc_norm {ours_norm:.2f}")
    print(f"lm-eval   : {n / theirs_s:6.2f} ex/s  acc {theirs_acc:.2f}  acc_norm {theirs_norm:.2f}")
    print(f"speed ratio {theirs_s / ours_s:.2f}x; accuracy difference {ours_acc - theirs_acc:+.2f} points "
          f"(acc_norm {ours_norm - theirs_norm:+.2f})")  # fmt: skip
    print(json.dumps({"n": n, "specialize_ex_s": n / ours_s, "lm_eval_ex_s": n / theirs_s, "ratio": theirs_s / ours_s,
                      "specialize_acc": ours_acc, "lm_eval_acc": theirs_acc, "specialize_acc_norm": ours_norm,
                      "lm_eval_acc_norm": theirs_norm}))  # fmt: skip


if __name__ == "__main__":
    main()
