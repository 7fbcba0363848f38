"""Real process kills and real multi-process runs, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_cfg(path: Path, model_dir: Path, shared: Path, out: Path, dropout: float = 0.1, **stage_over) -> Path:
    stage = {
        "name": "s1", "sources": [{"path": str(shared / "generalist/dolly_alpaca_fixtures/alpaca.json")}],
        "epochs": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "max_length": 96, **stage_over,
    }  # fmt: skip
    cfg = {
        "model": {"spec": str(model_dir), "dtype": "float32", "threads": 1},
        "method": "lora", "lora": {"dropout": dropout},  # dropout: resume must restore the RNG too
        "output_dir": str(out), "save_every": 5, "progress": False, "stages": [stage],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "specialize.cli", "train", str(cfg)]


def only_stage(out: Path) -> Path:
    [stage] = list((out / "stages").iterdir())
    return stage


def test_kill_9_then_rerun_matches_uninterrupted(tmp_path, tiny_model_dir, shared_data):
    ref_cfg = write_cfg(tmp_path / "ref.yaml", tiny_model_dir, shared_data, tmp_path / "ref", epochs=40)
    subprocess.run(train_cmd(ref_cfg), check=True, env=ENV, capture_output=True)

    cfg = write_cfg(tmp_path / "run.yaml", tiny_model_dir, shared_data, tmp_path / "run", epochs=40)
    proc = subprocess.Popen(train_cmd(cfg), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ckpts = list((tmp_path / "run").glob("stages/*/checkpoints/step-*/meta.json"))
        if ckpts and max(int(p.parent.name.split("-")[1]) for p in ckpts) >= 20:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stage = only_stage(tmp_path / "run")
    assert not (stage / "result.json").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in (stage / "checkpoints").glob("step-*"))
    assert len(list((stage / "checkpoints").glob("step-*"))) <= 2  # keep_checkpoints

    out = subprocess.run(train_cmd(cfg), check=True, env=ENV, capture_output=True, text=True)
    assert "resuming from" in out.stdout and f"step {killed_at}/240" in out.stdout
    ref = load_file(str(only_stage(tmp_path / "ref") / "adapter/adapter_model.safetensors"))
    got = load_file(str(stage / "adapter/adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 241))  # one metrics line per step, none lost, none repeated


def test_two_processes_agree_with_each_other_and_with_one(tmp_path, tiny_model_dir, shared_data):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # no dropout: each process draws its own dropout masks, which one process cannot reproduce
    kw = {"dropout": 0.0, "epochs": 2, "batch_size": 8}
    one = write_cfg(tmp_path / "one.yaml", tiny_model_dir, shared_data, tmp_path / "one", **kw)
    two = write_cfg(tmp_path / "two.yaml", tiny_model_dir, shared_data, tmp_path / "two", **kw)
    subprocess.run(train_cmd(one), check=True, env=ENV, capture_output=True)
    out = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", "29533", "-m", "specialize.cli", "train", str(two)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-8000:]}"
    # one report per run, printed by rank 0 and flushed before the ranks leave without finalization
    assert out.stdout.count("final loss") == 1, out.stdout
    result = json.loads((only_stage(tmp_path / "two") / "result.json").read_text())
    assert result["processes"] == 2  # both ranks' weight digests were gathered and found equal
    single = json.loads((only_stage(tmp_path / "one") / "result.json").read_text())
    assert result["final_loss"] == pytest.approx(single["final_loss"], abs=1e-5)
    a = load_file(str(only_stage(tmp_path / "one") / "adapter/adapter_model.safetensors"))
    b = load_file(str(only_stage(tmp_path / "two") / "adapter/adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
