"""Serving many specialists: mixed-adapter batches vs one adapter per batch vs switching adapters per request,
over HTTP on loopback with the `openai` client, same requests for each policy.

    .venv/bin/python benchmarks/serve_mixed.py [--requests 64] [--concurrency 8] [--adapters 4] [--max-tokens 32]
    .venv/bin/python benchmarks/serve_mixed.py --policies continuous --requests 200 --concurrency 8   # load test

Policies (one server each, in turn, in this process):
- continuous:  continuous batching, up to --batch rows, any adapters together (per-row LoRA in one forward pass)
- static:      waves of up to --batch requests, any adapters together, a wave admitted only into an empty batch
- per_adapter: static waves of a single adapter
- switch:      one request at a time, the adapter switched for each (what a server without batching does)
- continuous_peft: continuous, with PEFT's per-adapter loop for mixed batches instead of the stacked LoRA
- continuous_separate: continuous, each joining request prefilled in a forward of its own instead of in the
               running rows' decode forward
- direct:      no server: the same requests on a token loop driven in this thread (the next one submitted as one
               finishes, --concurrency in flight): what the server costs on top of the loop

`--steps` times single decode steps instead (no HTTP): --batch rows of base only vs base + --adapters adapters
round-robin, on the stacked LoRA and on PEFT's path, in the same run.

Adapters are LoRA r=8 on all linear layers of the embedded model (PEFT's default init, so they cost what real
adapters cost). Every policy serves the same requests greedily, so each generates the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
from common import SHARED, make_adapters

from specialize.generation import Request, SamplingParams, TokenLoop
from specialize.models import load_model, select_precision
from specialize.prompts import AlpacaTemplate
from specialize.serve.engine import Engine
from specialize.serve.server import ServeConfig, build_engine, running

POLICIES = {  # name: (loop policy, batch override, how mixed batches apply LoRA)
    "continuous": ("continuous", None, "stacked"),
    "continuous_peft": ("continuous", None, "peft"),
    "continuous_separate": ("continuous", None, "stacked"),  # joining prompts not in the decode forward
    "static": ("static", None, "stacked"),
    "per_adapter": ("per_adapter", None, "stacked"),
    "switch": ("per_adapter", 1, "stacked"),
    "direct": ("direct", None, "stacked"),  # the token loop without HTTP, in this thread
    "vllm": ("vllm", None, ""),  # this server on the vLLM engine (run from .venv-vllm)
    "vllm_openai": ("vllm_openai", None, ""),  # vLLM's own OpenAI server, same weights and adapters
}


def load_figures(latencies: list[float], tokens: int, wall: float, errors: int) -> dict:
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"requests": len(latencies), "errors": errors, "wall_s": wall, "tokens": tokens,
            "tok_s": tokens / wall, "req_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": q[18]}  # fmt: skip


async def load(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int, deadline: float,
               raw: bool = False) -> dict:  # fmt: skip
    """Chat requests; `raw`: the same Alpaca-rendered prompt as a completion, run to max_tokens (`ignore_eos`), so
    that two different servers receive identical token streams."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    latencies, tokens, errors = [], 0, 0

    async def one(model: str, prompt: str) -> None:
        nonlocal tokens, errors
        async with gate:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                if raw:
                    r = await client.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                                        prompt=AlpacaTemplate().render(prompt),
                                                        extra_body={"ignore_eos": True})  # fmt: skip
                else:
                    messages = [{"role": "user", "content": prompt}]
                    r = await client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                                             messages=messages)  # fmt: skip
                tokens += r.usage.completion_tokens
                latencies.append(time.perf_counter() - start)
            except openai.APIError as err:
                errors += 1
                print(f"error: {err}")

    start = time.perf_counter()
    await asyncio.gather(*(one(m, p) for m, p in jobs))
    wall = time.perf_counter() - start
    await client.close()
    return load_figures(latencies, tokens, wall, errors)


def direct(model, tok, adapters: dict[str, str], jobs: list[tuple[str, str]], concurrency: int, max_tokens: int,
           batch: int) -> tuple[dict, object]:  # fmt: skip
    """The load test's requests on a token loop in this thread, as the server renders them (the Alpaca template,
    greedy, up to max_tokens), `concurrency` in flight; returns (the load test's figures, the bare base model)."""
    from specialize.models import attach_adapters
    from specialize.prompts import encode_prompt

    model = attach_adapters(model, adapters)
    loop = TokenLoop(model, tok, select_precision("auto", "cpu"), max_rows=batch, prefill_tokens=256)
    t = AlpacaTemplate()
    pending, live, latencies, tokens = list(jobs), {}, [], 0

    def submit() -> None:
        name, prompt = pending.pop(0)
        r = Request([encode_prompt(t.render(prompt), t, tok)], SamplingParams(max_new_tokens=max_tokens),
                    adapter=None if name == "base" else name)  # fmt: skip
        loop.submit(r)
        live[id(r)] = (r, time.perf_counter())

    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        submit()
    while loop.busy:
        loop.step()
        for key, (r, began) in list(live.items()):
            if r.result is not None:
                del live[key]
                latencies.append(time.perf_counter() - began)
                tokens += len(r.result.token_ids)
                if pending:
                    submit()
    wall = time.perf_counter() - start
    loop.adapters_changed()  # drop its hooks
    return load_figures(latencies, tokens, wall, 0), model.unload()


async def latency_under_load(
    url: str, long_jobs: list[tuple[str, str]], short_jobs: list[tuple[str, str]], long_tokens: int, short_tokens: int
) -> dict:
    """Short requests alone, then the same short requests arriving while long ones decode: their latencies."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)

    async def ask(model: str, prompt: str, n: int) -> float:
        start = time.perf_counter()
        await client.chat.completions.create(model=model, max_tokens=n, temperature=0, extra_body={"ignore_eos": True},
                                             messages=[{"role": "user", "content": prompt}])  # fmt: skip
        return time.perf_counter() - start

    alone = [await ask(m, p, short_tokens) for m, p in short_jobs]
    longs = [asyncio.create_task(ask(m, p, long_tokens)) for m, p in long_jobs]
    await asyncio.sleep(1.0)  # the long requests are decoding
    loaded = []
    for m, p in short_jobs:
        loaded.append(await ask(m, p, short_tokens))
        await asyncio.sleep(0.2)
    long_s = await asyncio.gather(*longs)
    await client.close()

    def p95(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=20)[18] if len(xs) > 1 else xs[0]

    return {"alone_p50_s": statistics.median(alone), "alone_p95_s": p95(alone),
            "loaded_p50_s": statistics.median(loaded), "loaded_p95_s": p95(loaded), "long_s": max(long_s)}  # fmt: skip


@contextlib.contextmanager
def vllm_openai(adapters: dict[str, str], threads: int) -> Iterator[str]:
    """vLLM's own OpenAI server (a subprocess) over the same weights and adapters; yields its base URL."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    from specialize.models import EMBEDDED, weights_dir

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, range(threads))),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}  # fmt: skip
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights_dir(EMBEDDED)),
           "--served-model-name", "base", "--dtype", "bfloat16", "--port", str(port), "--host", "127.0.0.1",
           "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(adapters) + 1),
           "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vLLM's OpenAI server did not start") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def step_cost(model, tok, names: list[str], batch: int, lora: str, steps: int = 24) -> float:
    """Median seconds of one decode step of `batch` rows (same prompt, adapters round-robin over `names`)."""
    loop = TokenLoop(model, tok, select_precision("auto", "cpu"), max_rows=batch, lora=lora)  # type: ignore[arg-type]
    prompt = tok("Write a long story about a lighthouse keeper.")["input_ids"]
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
    loop.submit(*(Request([prompt], params, adapter=names[i % len(names)]) for i in range(batch)))
    while loop.waiting or loop.prefilling:
        loop.step()
    loop.step()  # warm
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loop.step()
        times.append(time.perf_counter() - start)
    loop.adapters_changed()  # drop its hooks
    return statistics.median(times)


def steps_report(adapters: dict[str, str], batch: int, threads: int) -> None:
    from specialize.generation.lora import NO_ADAPTER
    from specialize.models import attach_adapters

    model, tok = load_model("embedded", threads=threads)
    model = attach_adapters(model, adapters)
    mixed = [NO_ADAPTER, *adapters]
    base = step_cost(model, tok, [NO_ADAPTER], batch, "stacked")
    stacked = step_cost(model, tok, mixed, batch, "stacked")
    peft = step_cost(model, tok, mixed, batch, "peft")
    print(f"decode step, {batch} rows, {select_precision('auto', 'cpu').describe()}: base only {base * 1e3:.1f} ms; "
          f"base + {len(adapters)} adapters stacked {stacked * 1e3:.1f} ms ({stacked / base:.2f}x base), "
          f"PEFT per-adapter loop {peft * 1e3:.1f} ms ({peft / base:.2f}x base); stacked vs PEFT "
          f"{peft / stacked:.2f}x faster")  # fmt: skip


def print_load(policy: str, r: dict) -> None:
    print(f"{policy:12s} {r['requests']:4d} req  {r['errors']} errors  {r['wall_s']:7.1f} s  {r['tok_s']:6.1f} tok/s  "
          f"{r['req_s']:5.2f} req/s  p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=900, help="per policy; later requests are not sent")
    ap.add_argument("--policies", default="continuous,static,per_adapter,switch")
    ap.add_argument("--latency", action="store_true", help="short requests under long ones, instead of the load test")
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--steps", action="store_true", help="time single decode steps: base only vs mixed adapters")
    ap.add_argument("--raw", action="store_true", help="completions of the same rendered prompts, to max tokens")
    args = ap.parse_args()

    rows = json.loads((SHARED / "generalist/alpaca_gpt4_sample/alpaca_en_demo.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.adapters, Path(tmp))
        if args.steps:
            steps_report(adapters, args.batch, args.threads)
            return
        names = ["base", *adapters]
        jobs = [(names[i % len(names)], rows[i % len(rows)]["instruction"]) for i in range(args.requests)]
        model, tok = load_model("embedded", threads=args.threads)
        results = {}
        for policy in args.policies.split(","):
            mode, batch, lora = POLICIES[policy]
            if mode == "direct":
                if args.latency:
                    raise SystemExit("--latency needs a server: the direct policy measures the load test only")
                results[policy], model = direct(model, tok, adapters, jobs, args.concurrency, args.max_tokens,
                                                args.batch)  # fmt: skip
                print_load(policy, results[policy])
                continue
            cfg = ServeConfig(port=0, adapters=adapters, policy=mode if lora else "continuous",
                              max_batch_size=batch or args.batch, batch_wait_ms=20)  # fmt: skip
            if mode == "vllm":
                vcfg = cfg.model_copy(
                    update={"model": cfg.model.model_copy(update={"engine": "vllm", "threads": args.threads})}
                )
                engine = build_engine(vcfg)
            elif mode != "vllm_openai":
                engine = Engine(model, tok, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
                                policy=mode, precision=select_precision("auto", "cpu"), lora=lora)  # fmt: skip
                engine.loop.fused_prefill = policy != "continuous_separate"
                for name, path in adapters.items():
                    engine.add_adapter(name, path)
            with vllm_openai(adapters, args.threads) if mode == "vllm_openai" else running(cfg, engine) as url:
                if args.latency:
                    r = asyncio.run(latency_under_load(url, jobs[: args.concurrency // 2], jobs[-8:], args.long_tokens,
                                                       args.short_tokens))  # fmt: skip
                else:
                    r = asyncio.run(load(url, jobs, args.concurrency, args.max_tokens,
                                         time.perf_counter() + args.max_seconds, raw=args.raw))  # fmt: skip
            if not mode.startswith("vllm"):
                model = engine.model.unload()  # the bare base again, for the next policy's engine
            results[policy] = r
            if args.latency:
                print(f"{policy:12s} short requests alone p50 {r['alone_p50_s']:.2f} s p95 {r['alone_p95_s']:.2f} s; "
                      f"under {args.concurrency // 2} long requests p50 {r['loaded_p50_s']:.2f} s p95 "
                      f"{r['loaded_p95_s']:.2f} s ({r['loaded_p95_s'] / r['alone_p95_s']:.1f}x); long ones took "
                      f"{r['long_s']:.1f} s")  # fmt: skip
            else:
                print_load(policy, r)
    if "continuous" in results and not args.latency:
        for other in results.keys() - {"continuous"}:
            print(f"continuous vs {other}: {results['continuous']['tok_s'] / results[other]['tok_s']:.2f}x tokens/s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
