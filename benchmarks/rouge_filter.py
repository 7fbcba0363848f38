"""ROUGE-L near-duplicate filter: `specialize`'s pruned exact filter vs rouge-score pairwise, same stream.

Stream: Alpaca instructions in file order (real, with natural near-duplicates). Peer: rouge-score's LCS on
pre-tokenized instructions (self-instruct's own approach, minus its process pool), checking a candidate
against every kept instruction. Part 1 runs both over a prefix of the stream and checks the kept sets are
identical. Part 2 grows our pool to `--pool` instructions, then times single candidates against that pool
for both methods (the pairwise peer cannot run a whole 20k stream: ~2*10^8 LCS calls) and checks their
decisions agree.

    .venv/bin/python benchmarks/rouge_filter.py [--prefix 2000] [--pool 20000] [--probe 30]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from rouge_score import rouge_scorer, tokenizers

from specialize.synth.filters import RougePool

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--probe", type=int, default=30)
    args = ap.parse_args()
    rows = json.loads(
        gzip.decompress((SHARED / "generalist/alpaca_52k/alpaca_data_en_52k_derived.json.gz").read_bytes())
    )
    stream = [r["instruction"] for r in rows]
    tok = tokenizers.DefaultTokenizer(use_stemmer=False)

    # part 1: identical kept sets on a prefix
    t = time.perf_counter()
    kept_ref: list[list[str]] = []
    ref_decisions = []
    for s in stream[: args.prefix]:
        toks = tok.tokenize(s)
        keep = all(rouge_scorer._score_lcs(toks, k).fmeasure < 0.7 for k in kept_ref)
        ref_decisions.append(keep)
        if keep:
            kept_ref.append(toks)
    ref_s = time.perf_counter() - t
    t = time.perf_counter()
    pool = RougePool(0.7)
    ours = [pool.offer(s) for s in stream[: args.prefix]]
    ours_s = time.perf_counter() - t
    assert ours == ref_decisions, "kept sets differ"
    print(f"prefix {args.prefix}: identical decisions ({sum(ours)} kept); pairwise {ref_s:.1f}s, "
          f"specialize {ours_s:.2f}s -> {ref_s / ours_s:.0f}x")  # fmt: skip

    # part 2: per-candidate cost against a pool of `--pool` kept instructions
    i = args.prefix
    while len(pool) < args.pool and i < len(stream) - args.probe:
        pool.offer(stream[i])
        i += 1
    pool_tokens = pool._tokens  # the kept instructions, as token ids
    inv = {v: k for k, v in pool._vocab.items()}
    pool_words = [[inv[t] for t in ids] for ids in pool_tokens]
    probes = stream[i : i + args.probe]
    t = time.perf_counter()
    ref = []
    for s in probes:
        toks = tok.tokenize(s)
        ref.append(any(rouge_scorer._score_lcs(toks, k).fmeasure >= 0.7 for k in pool_words))
    ref_s = (time.perf_counter() - t) / len(probes)
    t = time.perf_counter()
    ours = [pool.near_duplicate(s) for s in probes]
    ours_s = (time.perf_counter() - t) / len(probes)
    assert ours == ref, "decisions differ at the large pool"
    print(f"pool {len(pool)}: {len(probes)} candidates, same decisions ({sum(ours)} near-duplicates); "
          f"pairwise {ref_s * 1000:.0f} ms/candidate, specialize {ours_s * 1000:.2f} ms/candidate "
          f"-> {ref_s / ours_s:.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
