"""Where a training step's time goes: the recipe's own step (model, loss, optimizer, batches as
`specialize train` builds them) under torch.profiler, operators grouped by what they do.

Real data (Alpaca-GPT4 or SuperNI sentiment), the embedded model, batch 8 as one micro-batch, max length 256,
2 threads; two warm-up steps, then `--steps` profiled steps. Self time per operator, so nothing is counted
twice; "Python / launch" is the wall time no operator accounts for. Padding is the share of the step's
token slots that are padding.

    .venv/bin/python benchmarks/train_profile.py [--data alpaca_gpt4|sentiment] [--method full|lora] [--steps 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile
from train_throughput import BATCH, DATA, SEQ

GROUPS = [  # first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::softmax")),
    ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("adam", "_foreach")),
    ("dtype casts", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone")),
    ("norms, RoPE, SiLU (elementwise)", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow",
                                         "aten::mean", "aten::cat", "aten::neg", "aten::sum", "aten::div",
                                         "aten::sub", "aten::cos", "aten::sin", "aten::where", "aten::fill_")),
    ("indexing, embedding", ("aten::index", "aten::embedding", "aten::gather", "aten::scatter", "masked",
                             "aten::nonzero")),
]  # fmt: skip


def group(name: str) -> str:
    low = name.lower()
    for label, keys in GROUPS:
        if any(k in low for k in keys):
            return label
    return "other operators"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="alpaca_gpt4", choices=list(DATA))
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-pack", action="store_true", help="one padded example per row (the recipe's pack: false)")
    ap.add_argument("--top", type=int, default=0, help="also list the N operators with most self time")
    args = ap.parse_args()

    from specialize import models
    from specialize.train import TrainConfig, sft
    from specialize.train.batching import collate, micro_batches
    from specialize.train.loss import ResponseLoss, honours_packing

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.model_validate({
            "model": {"spec": "embedded", "threads": args.threads}, "method": args.method, "output_dir": out,
            "save_every": 0, "progress": False, "lora": {"dropout": 0.0},
            "stages": [{"name": "p", "sources": [{**DATA[args.data], "amount": BATCH * (args.steps + 2)}],
                        "epochs": 1, "batch_size": BATCH, "micro_batch_size": BATCH, "lr": 1e-5, "max_length": SEQ}],
        })  # fmt: skip
        [prep] = sft.prepare_stages(cfg)
        models.set_threads(args.threads)
        precision = models.train_precision(cfg.model.dtype, "cpu")
        model, tok = sft.build_model(cfg, None, precision)
        features, _ = sft.tokenize_all(prep.examples, cfg, prep.config, tok)
        loss_fn = ResponseLoss(model)
        packed = not args.no_pack and honours_packing(model, precision.autocast("cpu"))
        capacity = SEQ if packed else None
        opt = sft.make_optimizer(model, prep.config)
        lengths = [len(f.input_ids) for f in features]
        steps = [list(range(i, i + BATCH)) for i in range(0, len(features) - BATCH + 1, BATCH)]

        def step(indices: list[int]) -> tuple[int, int]:
            real = slots = 0
            for mb in micro_batches(indices, lengths, BATCH, capacity):
                batch = collate([[features[i] for i in row] for row in mb], tok.pad_token_id, packed=packed)
                real += sum(lengths[i] for row in mb for i in row)
                slots += batch["input_ids"].numel()
                with precision.autocast("cpu"):
                    nll = loss_fn(**batch)
                nll.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return real, slots

        for s in steps[:2]:
            step(s)
        real = slots = 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for s in steps[2 : 2 + args.steps]:
                r, n = step(s)
                real, slots = real + r, slots + n
            wall = time.perf_counter() - t

    by_group: dict[str, float] = defaultdict(float)
    ops = prof.key_averages()
    for e in ops:
        by_group[group(e.key)] += e.self_cpu_time_total / 1e6
    accounted = sum(by_group.values())
    by_group["Python / launch (unaccounted)"] = max(0.0, wall - accounted)
    layout = "packed" if packed else "one example per row"
    print(f"{args.method} on {args.data}, {layout}: {args.steps} steps, {wall:.2f} s, {real / wall:.1f} tok/s, "
          f"padding {100 * (1 - real / slots):.1f}% of {slots} token slots")  # fmt: skip
    for label, sec in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {label:34s} {sec:7.2f} s  {100 * sec / wall:5.1f}%")
    if args.top:
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"    {e.key:50s} {e.self_cpu_time_total / 1e6:7.2f} s  x{e.count}  [{group(e.key)}]")


if __name__ == "__main__":
    main()
