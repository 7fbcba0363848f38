"""Every fingerprint the project computes: files, directories of weights, JSON-able settings, text, ids.

One module, so that a cache key written by one stage is computed the same way when another stage checks it.
File digests are memoized by (path, size, mtime): manifests, stage keys and eval keys ask for the digest of
the same model file many times per process, and hashing a 7B checkpoint takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_FILE_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (memoized while the file's size and mtime stay the same)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if (hit := _FILE_CACHE.get(key)) is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _FILE_CACHE[key] = digest = h.hexdigest()
    return digest


def fingerprint(obj: Any, length: int | None = 16) -> str:
    """sha256 of a JSON-able value with sorted keys (non-JSON values by `str`); `length=None` keeps all 64."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest if length is None else digest[:length]


def text_sha256(text: str, length: int | None = None) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return digest if length is None else digest[:length]


def lines_sha256(items: Iterable[str]) -> str:
    """sha256 of strings joined by newlines (e.g. the ids of an evaluated task, in order)."""
    return text_sha256("\n".join(items))


def weights_sha256(directory: str | Path) -> str:
    """Digest of every safetensors file of a weights directory (adapter or full model), by name order."""
    files = sorted(Path(directory).glob("*.safetensors"))
    return fingerprint([file_sha256(f) for f in files])


def content_id(prefix: str, *parts: str) -> str:
    """A stable id from content, so ids survive reordering and subsetting of a file (sha1: ids already
    written by earlier versions must not change)."""
    h = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{h}" if prefix else h


class Digest:
    """An incremental sha256 over tensors and strings (trainable weights, data mixes)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: str | bytes) -> Digest:
        self._h.update(data.encode("utf-8") if isinstance(data, str) else data)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()
