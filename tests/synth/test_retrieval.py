from __future__ import annotations

import json
from pathlib import Path

import pytest

from specialize.data import DataError
from specialize.synth.retrieval import Retriever, read_corpus


def test_real_corpus_index_build_search_and_reload(tmp_path: Path, shared_data: Path):
    corpus = shared_data / "biomed/corpus/corpus.jsonl.gz"
    r = Retriever.build(corpus, tmp_path / "idx")
    assert len(r.ids) == 10288
    [hits] = r.search(["breast cancer tumor prognosis"], 5)
    assert len(hits) == 5 and hits[0].score >= hits[-1].score > 0
    assert "breast" in hits[0].text.lower()
    again = Retriever.build(corpus, tmp_path / "idx")  # same corpus: loaded, not rebuilt
    assert [h.doc_id for h in again.search(["breast cancer tumor prognosis"], 5)[0]] == [h.doc_id for h in hits]


def test_bad_corpus(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'text': missing"):
        read_corpus(path)
