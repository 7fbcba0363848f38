"""Generation throughput: batched `specialize` generation vs a naive batch-1 `model.generate` loop, same
prompts, same greedy decoding, same number of new tokens; plus the cost of eq. 2 marginalization (k
retrieved-document contexts mixed at every step) per generated token against plain generation; and the token
loop's batch-1 and 16-row decode rates against the weight-read bound (the machine's read bandwidth, measured in
the same run, over the bytes of weights a token reads). Beside both ratios against naive generation it prints the
ratio that prompt prefill alone allows (each prompt's forward, measured in the same run): the limit were decoding
free, which a CPU without fast low-precision matmuls (fp32 on AVX2) reaches first.

    .venv/bin/python benchmarks/generation.py [--prompts 32] [--new 64] [--batch 16] [--k 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import SHARED, eq2_contexts

from specialize.generation import SamplingParams, generate, generate_mixture
from specialize.models import inference_mode, load_model, pack_linears, select_precision
from specialize.prompts import AlpacaTemplate, encode_prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model("embedded", threads=args.threads)
    t = AlpacaTemplate()
    rows = json.loads((SHARED / "generalist/alpaca_gpt4_sample/alpaca_en_demo.json").read_text())[: args.prompts]
    prompts = [t.render(r["instruction"], r["input"]) for r in rows]
    # both sides stop at EOS; throughput counts the tokens each really generated
    params = SamplingParams(max_new_tokens=args.new)
    eos = tok.eos_token_id

    precision = select_precision("auto", "cpu")
    # the weights in the layout every token loop gives them (packed bf16 where the CPU has native bf16), before
    # anything is timed: both sides of each ratio read the same weights the same way
    packed = pack_linears(model, precision)
    start = time.perf_counter()
    naive_tokens = 0
    with inference_mode(model, precision):
        for p in prompts:
            ids = torch.tensor([encode_prompt(p, t, tok)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new,
                do_sample=False,
                pad_token_id=eos,
                eos_token_id=eos,
            )
            new = out[0, ids.shape[1] :].tolist()
            naive_tokens += new.index(eos) if eos in new else len(new)
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    outs = generate(model, tok, prompts, t, params.model_copy(update={"max_new_tokens": args.new}),
                    batch_size=args.batch, precision=precision)  # fmt: skip
    ours_s = time.perf_counter() - start
    ours_tokens = sum(len(o.token_ids) for o in outs)

    # eq. 2 cost: k contexts per item mixed at every step vs one context, same items and new tokens
    items = prompts[: args.batch]
    ctx_k = eq2_contexts(tok, rows[: args.batch], args.k)
    ctx_1 = [[c[0]] for c in ctx_k]
    no_eos = type("NoEos", (), {"eos_token_id": -1, "pad_token_id": eos, "decode": tok.decode})()
    start = time.perf_counter()
    generate_mixture(model, no_eos, ctx_1, [[1.0]] * len(ctx_1), params, precision=precision)
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    generate_mixture(model, no_eos, ctx_k, [[1.0 / args.k] * args.k] * len(ctx_k), params, precision=precision)
    k_s = time.perf_counter() - start
    # the peer of eq. 2: naive batch-1 `model.generate` over one document context per item, same answer length
    start = time.perf_counter()
    with inference_mode(model, precision):
        for ctx in ctx_1:
            ids = torch.tensor([ctx[0]])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=eos, eos_token_id=eos)  # fmt: skip
    naive_doc_s = time.perf_counter() - start
    # the floor under both ratios: prompt prefill is compute-bound wherever matmuls lack a fast low-precision path
    # (fp32 on AVX2 runs it near the CPU's peak at batch 1 already), so batching cannot make it cheaper; eq. 2 has
    # k times the prompt tokens of its peer
    prompt_prefill_s = prefill_seconds(model, precision, [encode_prompt(p, t, tok) for p in prompts])
    k_prefill_s = prefill_seconds(model, precision, [c for ctx in ctx_k for c in ctx])
    per_tok_1 = one_s / (len(items) * args.new)
    per_tok_k = k_s / (len(items) * args.new)
    print(f"{len(prompts)} prompts x {args.new} new tokens, greedy, {args.threads} threads, {precision.describe()} "
          f"weights, {packed} linear layers packed")  # fmt: skip
    print(f"naive batch-1 model.generate: {naive_tokens / naive_s:6.1f} tok/s")
    print(f"specialize batched (batch {args.batch}): {ours_tokens / ours_s:6.1f} tok/s "
          f"-> {(ours_tokens / ours_s) / (naive_tokens / naive_s):.1f}x")  # fmt: skip
    print(f"  prefill of the {len(prompts)} prompts alone (batch 1): {prompt_prefill_s:.1f} s of naive's "
          f"{naive_s:.1f} s: with decoding free, batching could reach at most "
          f"{naive_s / prompt_prefill_s:.1f}x")  # fmt: skip
    print(f"eq. 2 marginalization over k={args.k} documents: {per_tok_k * 1000:.1f} ms per generated token vs "
          f"{per_tok_1 * 1000:.1f} ms with one document context ({per_tok_k / per_tok_1:.2f}x)")  # fmt: skip
    answers = len(items) * args.new
    print(f"eq. 2 answer tokens/s over k={args.k} documents: {answers / k_s:.1f} vs naive batch-1 model.generate "
          f"over one document: {answers / naive_doc_s:.1f} ({naive_doc_s / k_s:.2f}x)")  # fmt: skip
    print(f"  prefill of the {len(items)} x {args.k} document contexts alone (batch 1): {k_prefill_s:.1f} s of eq. 2's "
          f"{k_s:.1f} s: with decoding free, eq. 2 could reach at most {naive_doc_s / k_prefill_s:.2f}x")  # fmt: skip
    decode_vs_bound(model, tok, t, precision, args)


def prefill_seconds(model, precision, prompts: list[list[int]]) -> float:
    """Seconds to prefill each prompt alone (one forward, last position's logits only, as the token loop does)."""
    with inference_mode(model, precision):
        model(input_ids=torch.tensor([prompts[0]]), logits_to_keep=1)  # warm
        start = time.perf_counter()
        for p in prompts:
            model(input_ids=torch.tensor([p]), logits_to_keep=1)
    return time.perf_counter() - start


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads: the best of a few full passes over a tensor larger than any cache."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def decode_vs_bound(model, tok, t, precision, args) -> None:
    """Batch-1 decode reads every weight once per token: bandwidth / weight bytes bounds its tokens/s."""
    weight_dtype = precision.autocast_dtype or precision.param_dtype  # what the matmuls read (bf16 by default)
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.finfo(weight_dtype).bits // 8
    bw = read_bandwidth()
    bound = bw / weight_bytes
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    prompt = t.render("Write a long story about a lighthouse keeper.")
    generate(model, tok, [prompt], t, params.model_copy(update={"max_new_tokens": 4}), precision=precision)  # warm
    start = time.perf_counter()
    generate(model, tok, [prompt], t, params, batch_size=1, precision=precision)
    one = args.new / (time.perf_counter() - start)
    start = time.perf_counter()
    generate(model, tok, [prompt] * 16, t, params, batch_size=16, precision=precision)
    sixteen = 16 * args.new / (time.perf_counter() - start)
    # the same batch-1 decode with its steps compiled (`compile_decode`); the first call compiles
    start = time.perf_counter()
    warm = params.model_copy(update={"max_new_tokens": 4})
    generate(model, tok, [prompt], t, warm, precision=precision, compile_decode=True)
    compiling = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, tok, [prompt], t, params, batch_size=1, precision=precision, compile_decode=True)
    compiled = args.new / (time.perf_counter() - start)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of {weight_dtype} weights per token "
          f"-> bound {bound:.1f} tok/s at batch 1")  # fmt: skip
    print(f"token loop batch-1 greedy decode: {one:.1f} tok/s = {100 * one / bound:.0f}% of the bound; "
          f"16 rows: {sixteen:.1f} tok/s = {sixteen / one:.1f}x batch 1")  # fmt: skip
    print(f"token loop batch-1 greedy decode, compiled: {compiled:.1f} tok/s = {100 * compiled / bound:.0f}% of the "
          f"bound ({compiled / one:.2f}x eager; compiling took {compiling:.0f} s, once per model and process); "
          f"16 rows (eager) = {sixteen / compiled:.1f}x compiled batch 1")  # fmt: skip


if __name__ == "__main__":
    main()
