"""BM25 retrieval over an unlabeled domain corpus (bm25s), built once and saved next to its documents.

A corpus is JSONL with `id` and `text` (and optionally `title`, prepended to the text), gzipped or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specialize.data import DataError
from specialize.data.readers import iter_jsonl
from specialize.hashing import file_sha256
from specialize.io import atomic_path


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    text: str


def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
    path = Path(path)
    ids, texts = [], []
    for lineno, row in iter_jsonl(path):
        for key in ("id", "text"):
            if not isinstance(row.get(key), str | int) or row.get(key) in ("", None):
                raise DataError(path, lineno, key, "missing or empty")
        title = row.get("title") or ""
        ids.append(str(row["id"]))
        texts.append(f"{title}\n{row['text']}" if title else row["text"])
    if not ids:
        raise DataError(path, None, None, "corpus is empty")
    if len(set(ids)) != len(ids):
        raise DataError(path, None, "id", "duplicate document ids")
    return ids, texts


class Retriever:
    def __init__(self, bm25, ids: list[str], texts: list[str]):
        self._bm25 = bm25
        self.ids = ids
        self.texts = texts

    @classmethod
    def build(cls, corpus: str | Path, index_dir: str | Path) -> Retriever:
        """Load the index for this exact corpus from `index_dir`, or build and save it there."""
        import bm25s

        index_dir = Path(index_dir)
        digest = file_sha256(corpus)
        meta = index_dir / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("corpus_sha256") == digest:
            return cls.load(index_dir)
        ids, texts = read_corpus(corpus)
        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        with atomic_path(index_dir, is_dir=True) as tmp:
            bm25.save(str(tmp / "bm25"), show_progress=False)
            with (tmp / "docs.jsonl").open("w", encoding="utf-8") as f:
                for i, t in zip(ids, texts, strict=True):
                    f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
            (tmp / "meta.json").write_text(
                json.dumps({"corpus": str(corpus), "corpus_sha256": digest, "docs": len(ids)})
            )
        return cls(bm25, ids, texts)

    @classmethod
    def load(cls, index_dir: str | Path) -> Retriever:
        import bm25s

        index_dir = Path(index_dir)
        bm25 = bm25s.BM25.load(str(index_dir / "bm25"), show_progress=False)
        rows = [json.loads(line) for line in (index_dir / "docs.jsonl").read_text(encoding="utf-8").splitlines()]
        return cls(bm25, [r["id"] for r in rows], [r["text"] for r in rows])

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        import bm25s

        tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        k = min(k, len(self.ids))
        docs, scores = self._bm25.retrieve(tokens, k=k, show_progress=False)
        return [
            [Hit(self.ids[int(d)], float(s), self.texts[int(d)]) for d, s in zip(drow, srow, strict=True)]
            for drow, srow in zip(docs, scores, strict=True)
        ]
