"""Training throughput: `specialize train` vs TRL's SFTTrainer, side by side in one process.

Same model (embedded SmolLM2-135M), same examples, max length 256, batch 8, same LoRA (r 8, alpha 16, all
linear layers, no dropout) or full fine-tuning, bf16 autocast, same thread count. Tokens/s counts the
non-padding tokens that reach the decoder (a forward hook, identical for both trainers); the first steps
are warm-up and not timed. MFU = model FLOPs per token x tokens/s / the best bf16 matmul throughput measured
in the same run over the model's GEMM shapes: 6N for full fine-tuning, and for LoRA the FLOPs it does, 4N (the
forward and the input-gradient backward through the frozen weights, which need no weight gradient) + 6 x the
adapter's parameters.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--threads 2] [--data alpaca_gpt4|sentiment]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = {
    "alpaca_gpt4": {"path": str(SHARED / "generalist/alpaca_gpt4_sample/alpaca_en_demo.json")},
    "sentiment": {"path": str(SHARED / "superni/tasks"), "categories": ["Sentiment Analysis"]},
}
SEQ, BATCH, WARMUP = 256, 8, 2


def matmul_peak(threads: int) -> float:
    """Best bf16 matmul FLOP/s over the model's GEMM shapes (tokens x hidden x ffn) and a large square."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (4096, 4096, 4096)]:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        reps = 8
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


class TokenClock:
    """Counts decoder tokens and times optimizer steps after warm-up, whoever drives the model."""

    def __init__(self, decoder: torch.nn.Module):
        self.tokens = 0
        self.calls = 0
        self.t0: float | None = None
        self.handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not torch.is_grad_enabled():  # checks outside training (the recipe's packing check) are no steps
            return
        self.calls += 1
        if self.calls == WARMUP + 1:  # one forward per step (batch == micro-batch)
            self.t0 = time.perf_counter()
        if self.calls > WARMUP and kwargs.get("attention_mask") is not None:
            self.tokens += int(kwargs["attention_mask"].sum())

    def rate(self) -> float:
        # the last step's backward and optimizer update are inside the measured window too
        return self.tokens / (time.perf_counter() - self.t0)


def lora_params() -> int:
    """Parameters of the benchmark's adapter (r 8 on every linear layer of the decoder)."""
    from peft import LoraConfig, get_peft_model

    from specialize.models import meta_model

    model = get_peft_model(meta_model(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def examples_for(data: str, n: int):
    from specialize.train.mixing import SourceSpec, build_mix

    examples, _ = build_mix([SourceSpec(**DATA[data], amount=n)], seed=0)
    return examples


def run_specialize(method: str, data: str, steps: int, threads: int, compile_: bool) -> float:
    from specialize.train import TrainConfig, run_training, sft

    clock: list[TokenClock] = []
    real_build = sft.build_model

    def build_and_clock(*args):
        model, tok = real_build(*args)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        clock.append(TokenClock(base.get_decoder()))
        return model, tok

    sft.build_model = build_and_clock
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.model_validate({
            "model": {"spec": "embedded", "threads": threads}, "method": method, "output_dir": out,
            "save_every": 0, "progress": False, "compile": compile_, "lora": {"dropout": 0.0},
            "stages": [{"name": "bench", "sources": [{**DATA[data], "amount": BATCH * (steps + WARMUP)}],
                        "epochs": 1, "batch_size": BATCH, "micro_batch_size": BATCH, "lr": 1e-5,
                        "max_length": SEQ}],
        })  # fmt: skip
        try:
            [res] = run_training(cfg)
        finally:
            sft.build_model = real_build
        # packed rows carry no attention mask to count: the timed steps' real tokens come from the recipe's metrics
        steps = [json.loads(line) for line in (Path(res.dir) / "metrics.jsonl").read_text().splitlines()]
        clock[0].tokens = sum(r["tokens"] for r in steps[WARMUP:])
    return clock[0].rate()


def run_trl(method: str, data: str, steps: int, threads: int, checkpointing: bool) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from specialize.models import load_model
    from specialize.prompts import AlpacaTemplate, render_prompt

    torch.set_num_threads(threads)
    model, tok = load_model("embedded", dtype="float32", threads=threads)
    t = AlpacaTemplate()
    rows = [{"prompt": render_prompt(e, t), "completion": e.output}
            for e in examples_for(data, BATCH * (steps + WARMUP))]  # fmt: skip
    clock = TokenClock(model.get_decoder())
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
            max_steps=steps + WARMUP, learning_rate=1e-5, max_length=SEQ, bf16=True, use_cpu=True,
            logging_steps=1000, save_strategy="no", report_to=[], completion_only_loss=True,
            dataloader_num_workers=0, seed=0, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        peft_config = None
        if method == "lora":
            peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM")  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=peft_config)  # fmt: skip
        trainer.train()
    return clock.rate()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="alpaca_gpt4", choices=list(DATA))
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--compile", action="store_true", help="also time specialize with torch.compile")
    args = ap.parse_args()

    from specialize.models import load_model

    params = sum(p.numel() for p in load_model("embedded")[0].parameters())
    flops = {"full": 6 * params, "lora": 4 * params + 6 * lora_params()}  # per token
    peak = matmul_peak(args.threads)
    print(f"bf16 matmul peak: {peak / 1e12:.3f} TFLOP/s ({args.threads} threads); params {params / 1e6:.1f}M")
    rows = []
    for method in args.methods.split(","):
        ours = run_specialize(method, args.data, args.steps, args.threads, compile_=False)
        # TRL's default turns activation checkpointing on; time it both ways
        theirs = run_trl(method, args.data, args.steps, args.threads, checkpointing=True)
        theirs_nockpt = run_trl(method, args.data, args.steps, args.threads, checkpointing=False)
        row = {"method": method, "data": args.data, "specialize_tok_s": ours, "trl_tok_s": theirs,
               "trl_no_ckpt_tok_s": theirs_nockpt, "ratio": ours / theirs, "ratio_no_ckpt": ours / theirs_nockpt,
               "mfu_specialize": flops[method] * ours / peak, "mfu_trl": flops[method] * theirs / peak,
               "mfu_trl_no_ckpt": flops[method] * theirs_nockpt / peak}  # fmt: skip
        if args.compile:
            row["specialize_compiled_tok_s"] = run_specialize(method, args.data, args.steps, args.threads, True)
            row["mfu_specialize_compiled"] = flops[method] * row["specialize_compiled_tok_s"] / peak
        rows.append(row)
        print(
            f"{method:5s} {args.data}: specialize {ours:7.1f} tok/s (MFU {row['mfu_specialize']:.1%})  "
            f"TRL {theirs:7.1f} tok/s (MFU {row['mfu_trl']:.1%}; {theirs_nockpt:.1f} without checkpointing)  "
            f"ratio {row['ratio']:.2f}x ({row['ratio_no_ckpt']:.2f}x)"
            + (f"  compiled {row['specialize_compiled_tok_s']:.1f} tok/s" if args.compile else "")
        )
    print(json.dumps({"peak_flops": peak, "params": params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
