"""BM25 retrieval: `specialize` (bm25s, as `synth` uses it) vs rank_bm25, same corpus, queries and top-k.

Corpus: the biomedical abstracts (10,288 documents). Queries: PubMedQA questions. Both engines index the
same tokens (bm25s's tokenizer with English stopwords), so the comparison is of the scoring engines; the
overlap of their top-k lists is reported (their BM25 variants differ slightly: Lucene IDF vs Okapi with an
IDF floor).

    .venv/bin/python benchmarks/bm25.py [--queries 500] [--k 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bm25s
import numpy as np
from rank_bm25 import BM25Okapi

from specialize.synth.retrieval import Retriever, read_corpus

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--index", default="/tmp/specialize-bench-bm25")
    args = ap.parse_args()
    corpus = SHARED / "biomed/corpus/corpus.jsonl.gz"
    pubmedqa = json.loads((SHARED / "biomed/pubmedqa/ori_pqal.json").read_text())
    queries = [v["QUESTION"] for v in pubmedqa.values()][: args.queries]

    t = time.perf_counter()
    ours = Retriever.build(corpus, args.index)
    build_ours = time.perf_counter() - t
    ids, texts = read_corpus(corpus)
    t = time.perf_counter()
    tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    peer = BM25Okapi(tokens)
    build_peer = time.perf_counter() - t

    t = time.perf_counter()
    hits = ours.search(queries, args.k)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    q_tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    peer_top = [np.argsort(-peer.get_scores(q))[: args.k] for q in q_tokens]
    peer_s = time.perf_counter() - t
    overlap = np.mean([len({h.doc_id for h in hs} & {ids[j] for j in top}) / args.k
                       for hs, top in zip(hits, peer_top, strict=True)])  # fmt: skip
    print(f"{len(ids)} documents, {len(queries)} queries, top-{args.k}")
    print(f"index build: specialize/bm25s {build_ours:.2f}s (incl. save), rank_bm25 {build_peer:.2f}s")
    print(f"queries/s: specialize {len(queries) / ours_s:.0f}, rank_bm25 {len(queries) / peer_s:.1f} "
          f"-> {peer_s / ours_s:.0f}x; top-{args.k} overlap {overlap:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
