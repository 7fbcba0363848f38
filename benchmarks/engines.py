"""Generation engines side by side: the vLLM engine vs the transformers engine (the project's token loop) on the
same prompts, same precision, greedy, the same number of new tokens (`ignore_eos`), in one process. Runs in the
vLLM environment (`make vllm`), where both engines exist:

    .venv-vllm/bin/python benchmarks/engines.py [--prompts 64] [--new 64] [--adapters 3]

Two loads: the base model alone, and base + adapters round-robin (LoRA r 8 on all linear layers, PEFT's default
init, so they cost what real adapters cost).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import SHARED, make_adapters

from specialize.generation import SamplingParams, prompt_requests
from specialize.generation.engines import HFEngine
from specialize.generation.lora import NO_ADAPTER
from specialize.generation.vllm_engine import VLLMEngine
from specialize.models import EMBEDDED, attach_adapters, load_model, select_precision, weights_dir
from specialize.prompts import AlpacaTemplate


def timed(engine, requests) -> tuple[float, int]:
    start = time.perf_counter()
    outs = engine.run(requests)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="rows of the transformers engine")
    args = ap.parse_args()
    precision = select_precision("auto", "cpu")
    dtype = str(precision.param_dtype).removeprefix("torch.")
    rows = json.loads((SHARED / "generalist/alpaca_gpt4_sample/alpaca_en_demo.json").read_text())
    t = AlpacaTemplate()
    prompts = [t.render(r["instruction"], r["input"]) for r in rows[: args.prompts]]
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.adapters, Path(tmp))
        model, tok = load_model(EMBEDDED, threads=args.threads, precision=precision)
        model = attach_adapters(model, adapters)
        hf = HFEngine(model, tok, precision, batch_size=args.batch)
        start = time.perf_counter()
        vllm = VLLMEngine(weights_dir(EMBEDDED), dtype=dtype, adapters=adapters, threads=args.threads)
        startup = time.perf_counter() - start
        names = [NO_ADAPTER, *adapters]
        loads = {
            "base only": prompt_requests(tok, prompts, t, params, adapter=NO_ADAPTER),
            f"base + {args.adapters} adapters": [
                r for i, p in enumerate(prompts)
                for r in prompt_requests(tok, [p], t, params, adapter=names[i % len(names)])
            ],
        }  # fmt: skip
        timed(vllm, loads["base only"][:4])  # warm both
        timed(hf, loads["base only"][:4])
        print(f"{len(prompts)} prompts x {args.new} new tokens, greedy, {dtype}, {args.threads} threads; vLLM "
              f"engine started in {startup:.1f} s")  # fmt: skip
        for name, reqs in loads.items():
            v_s, v_tok = timed(vllm, [r.__class__(r.contexts, r.params, adapter=r.adapter) for r in reqs])
            h_s, h_tok = timed(hf, [r.__class__(r.contexts, r.params, adapter=r.adapter) for r in reqs])
            print(f"{name:22s} vLLM {v_tok / v_s:7.1f} tok/s   transformers engine ({args.batch} rows) "
                  f"{h_tok / h_s:7.1f} tok/s   ratio {(v_tok / v_s) / (h_tok / h_s):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
