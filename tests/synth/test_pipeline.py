"""The synth flow with the embedded model, small: provenance, stats, and resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specialize.config import ConfigError
from specialize.synth.pipeline import SynthConfig, read_log, run_synth

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def small_args(shared: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "specialize.cli", "synth", "--domain", "biomedical",
        "--seeds", str(shared / "biomed/box_seeds/BoX_instructions.json"),
        "--corpus", str(shared / "biomed/corpus/corpus.jsonl.gz"), "--num", "6", "--top-k", "2", "--out", str(out),
        "--threads", "2", "--set", "batch_size=2", "--set", "instruction_sampling.max_new_tokens=160",
        "--set", "response_sampling.max_new_tokens=24",
        # the 135M model rarely writes an Input line; keeping items without one bounds the number of batches
        "--set", "require_input=false",
    ]  # fmt: skip


def without_timestamps(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r["metadata"].pop("timestamps")
    return rows


@pytest.mark.slow
def test_synth_resumes_after_kill_to_the_same_dataset(tmp_path: Path, shared_data: Path):
    ref = subprocess.run(small_args(shared_data, tmp_path / "ref"), env=ENV, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = without_timestamps(tmp_path / "ref/data.jsonl")
    assert len(reference) == 6
    for r in reference:
        prov = r["metadata"]["provenance"]
        assert len(prov["seed_demo_ids"]) == 3 and all(d.startswith("box-") for d in prov["seed_demo_ids"])
        assert len(prov["docs"]) == 2 and len(prov["weights"]) == 2 and abs(sum(prov["weights"]) - 1) < 1e-6
        assert prov["instruction_sampling"]["temperature"] == 1.0 and prov["instruction_sampling"]["top_p"] == 0.98
        assert prov["model"]["kind"] == "embedded" and prov["iteration"] == 1
        assert prov["engine"] == {"instruction": "hf", "response": "hf"}
    stats = json.loads((tmp_path / "ref/stats.json").read_text())
    assert stats["filters"]["kept"] == 6 and stats["final_examples"] == 6
    assert (tmp_path / "ref/stats.png").read_bytes()[:4] == b"\x89PNG"

    # kill -9 once the first response batch is logged, then rerun the same command
    out = tmp_path / "run"
    proc = subprocess.Popen(small_args(shared_data, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not read_log(out / "responses.log.jsonl"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "data.jsonl").exists(), "the run finished before it could be killed"
    with (out / "responses.log.jsonl").open("a") as f:
        f.write('{"time": 1, "items": [{"id": "half-writt')  # a line cut off mid-write must be ignored
    rerun = subprocess.run(small_args(shared_data, out), env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert without_timestamps(out / "data.jsonl") == reference
    ids = [r["id"] for rec in read_log(out / "responses.log.jsonl") for r in rec["items"]]
    assert sorted(ids) == sorted(r["id"] for r in reference)  # nothing answered twice, nothing lost


def test_config_errors_before_any_model_work(tmp_path: Path, shared_data: Path):
    seeds = str(shared_data / "biomed/box_seeds/BoX_instructions.json")
    with pytest.raises(ConfigError, match="needs a corpus"):
        run_synth(SynthConfig(seeds=seeds, output_dir=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="needs an adapter"):
        run_synth(SynthConfig(seeds=seeds, retrieval="none", contrastive=True, output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="fewer than demos_per_prompt"):
        run_synth(SynthConfig(seeds=seeds, retrieval="none", seeds_per_task=1, demos_per_prompt=40,
                              output_dir=str(tmp_path)))  # fmt: skip


@pytest.mark.slow
def test_response_variants_share_one_instruction_stage_and_a_later_run_can_answer_it_again(
    tmp_path: Path, shared_data: Path, monkeypatch
):
    """Kang et al. Table 2: variants that differ only in how responses are made answer one instruction set,
    written once; `instructions_from` answers a finished run's instructions again without writing new ones."""
    from specialize.synth import pipeline

    calls: list[str] = []
    real = pipeline.Engines.run
    monkeypatch.setattr(pipeline.Engines, "run", lambda self, reqs, what: calls.append(what) or real(self, reqs, what))
    common = dict(seeds=str(shared_data / "biomed/box_seeds/BoX_instructions.json"), num=3, batch_size=2,
                  corpus=str(shared_data / "biomed/corpus/corpus.jsonl.gz"), top_k=2, require_input=False,
                  instruction_sampling={"max_new_tokens": 160, "temperature": 1.0, "top_p": 0.98},
                  response_sampling={"max_new_tokens": 8, "temperature": 0.0},
                  instructions_root=str(tmp_path / "i"))  # fmt: skip
    top1 = SynthConfig(**common, retrieval="top1", output_dir=str(tmp_path / "top1"))
    none = SynthConfig(**common, retrieval="none", output_dir=str(tmp_path / "none"))
    assert top1.instruction_dir == none.instruction_dir and top1.fingerprint() != none.fingerprint()
    a = [json.loads(x) for x in run_synth(top1, progress=False).read_text().splitlines()]
    made = calls.count("synth instructions")
    assert made >= 1 and (top1.instruction_dir / "instructions.log.jsonl").is_file()
    assert not (tmp_path / "top1" / "instructions.log.jsonl").exists()
    b = [json.loads(x) for x in run_synth(none, progress=False).read_text().splitlines()]
    assert calls.count("synth instructions") == made  # the second variant wrote no instruction
    assert [(r["id"], r["instruction"], r["input"]) for r in a] == [(r["id"], r["instruction"], r["input"]) for r in b]
    assert all(len(r["metadata"]["provenance"]["docs"]) == 1 for r in a)
    assert all(r["metadata"]["provenance"]["docs"] == [] for r in b)

    again = SynthConfig(**{**common, "instructions_root": None}, retrieval="none", seed=1,
                        instructions_from=str(tmp_path / "top1"), output_dir=str(tmp_path / "again"))  # fmt: skip
    c = [json.loads(x) for x in run_synth(again, progress=False).read_text().splitlines()]
    assert calls.count("synth instructions") == made
    assert [r["instruction"] for r in c] == [r["instruction"] for r in a]
    with pytest.raises(ConfigError, match="no finished instruction stage"):
        run_synth(again.model_copy(update={"instructions_from": str(tmp_path / "none" / "missing")}))
