"""The training recipe on a tiny model: exact accumulation, chaining, reuse, outputs, early config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specialize.config import ConfigError
from specialize.train import TrainConfig, TrainConfigError, load_train_config, run_training


def make_cfg(tmp: Path, model_dir: Path, shared: Path, **over) -> TrainConfig:
    stage = {
        "name": "s1",
        "sources": [{"path": str(shared / "generalist/dolly_alpaca_fixtures/alpaca.json")}],
        "epochs": 1, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "max_length": 96,
    }  # fmt: skip
    data = {
        "model": {"spec": str(model_dir), "dtype": "float32", "threads": 1},
        "method": "lora", "output_dir": str(tmp), "save_every": 0, "progress": False,
        "stages": [stage], **over,
    }  # fmt: skip
    return TrainConfig.model_validate(data)


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.output) / "adapter_model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_accumulation_equals_full_batch(tmp_path, tiny_model_dir, shared_data, method):
    """One micro-batch of 8 and eight of 1 give the same step: the loss is normalized by the step's
    response tokens, not averaged per micro-batch."""
    runs = []
    for micro in (8, 1):
        cfg = make_cfg(tmp_path / f"m{micro}", tiny_model_dir, shared_data, method=method)
        cfg.stages[0].micro_batch_size = micro
        [res] = run_training(cfg)
        runs.append(res)
        assert res.steps == 3  # 23 examples, batch 8
    if method == "lora":
        assert_close(adapter(runs[0]), adapter(runs[1]), atol=1e-6)
    else:
        a = load_file(str(Path(runs[0].output) / "model.safetensors"))
        b = load_file(str(Path(runs[1].output) / "model.safetensors"))
        assert_close(a, b, atol=1e-6)
    losses = [[json.loads(x)["loss"] for x in (Path(r.dir) / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_two_stages_chain_and_stage_one_is_reused(tmp_path, tiny_model_dir, shared_data):
    cfg = make_cfg(tmp_path, tiny_model_dir, shared_data)
    s2 = cfg.stages[0].model_copy(update={"name": "s2", "lr": 1e-12})
    s2.sources = [
        s2.sources[0].model_copy(update={"path": str(shared_data / "generalist/dolly_alpaca_fixtures/dolly.json")})
    ]
    cfg.stages.append(s2)
    r1, r2 = run_training(cfg)
    a1, a2 = adapter(r1), adapter(r2)
    assert any(v.abs().sum() > 0 for k, v in a1.items() if "lora_B" in k)  # stage 1 learned something
    assert_close(a1, a2, atol=1e-6)  # stage 2 (lr ~0) starts from stage 1's adapter, not a fresh one
    assert json.loads((Path(r2.dir) / "data.json").read_text())["sources"][0]["selected"] == 12

    mtime = (Path(r1.dir) / "metrics.jsonl").stat().st_mtime_ns
    cfg.stages[1].lr = 1e-3  # a sweep that changes only stage 2
    q1, q2 = run_training(cfg)
    assert q1.reused and q1.dir == r1.dir
    assert not q2.reused and q2.dir != r2.dir
    assert (Path(r1.dir) / "metrics.jsonl").stat().st_mtime_ns == mtime
    again = run_training(cfg)
    assert all(r.reused for r in again)  # nothing left to compute
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["final"] == q2.output

    expected = adapter(q2)
    moved = tmp_path.parent / f"{tmp_path.name}-moved"  # a cache copied to another machine or path
    tmp_path.rename(moved)
    try:
        m1, m2 = run_training(cfg.model_copy(update={"output_dir": str(moved)}))
        assert m1.reused and m2.reused and Path(m2.output).is_relative_to(moved)
        assert_close(adapter(m2), expected, atol=0)
    finally:
        moved.rename(tmp_path)


def test_adapter_loads_with_plain_peft_and_merges(tmp_path, tiny_model_dir, shared_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, tiny_model_dir, shared_data, merge=True)
    [res] = run_training(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, res.output).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(Path(res.dir) / "merged")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(ids).logits,
                                  merged(ids).logits)  # fmt: skip
    cfg_json = json.loads((Path(res.output) / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and cfg_json["lora_alpha"] == 16


def test_bad_configs_fail_before_training(tmp_path, tiny_model_dir, shared_data):
    cfg = make_cfg(tmp_path / "a", tiny_model_dir, shared_data)
    bad_stage = cfg.stages[0].model_copy(update={"name": "s2"})
    bad_stage.sources = [bad_stage.sources[0].model_copy(update={"amount": 1000})]
    cfg.stages.append(bad_stage)
    with pytest.raises(TrainConfigError, match="stage 's2'.*asked for 1000 examples but only 23"):
        run_training(cfg)
    assert not (tmp_path / "a").exists()  # stage 1 did not train

    cfg = make_cfg(tmp_path / "b", tiny_model_dir, shared_data)
    cfg.stages[0].sources[0].path = str(tmp_path / "missing.json")
    with pytest.raises(TrainConfigError, match="does not exist"):
        run_training(cfg)

    cfg = make_cfg(tmp_path / "c", tiny_model_dir, shared_data, method="qlora")
    if not torch.cuda.is_available():
        with pytest.raises(TrainConfigError, match="needs a CUDA GPU"):
            run_training(cfg)

    yaml_path = tmp_path / "t.yaml"
    yaml_path.write_text("stages:\n  - name: s1\n    epochs: 1\n")
    with pytest.raises(ConfigError, match=r"stages\.0\.sources: Field required"):
        load_train_config(str(yaml_path))
    with pytest.raises(ConfigError, match="Extra inputs"):
        load_train_config("two_stage_lima", ["stages.0.learning_rate=1"])


def test_presets_load_with_paper_settings():
    lima = load_train_config("two_stage_lima")
    assert [(s.epochs, s.batch_size, s.lr) for s in lima.stages] == [(15, 64, 2e-5), (3, 128, 2e-5)]
    gpt4 = load_train_config("two_stage_alpaca_gpt4")
    assert [(s.epochs, s.batch_size) for s in gpt4.stages] == [(3, 128), (3, 128)]
    ss = load_train_config("self_specialization_lora")
    assert (ss.lora.r, ss.lora.alpha, ss.lora.target_modules) == (8, 16, "all-linear")
    assert (ss.stages[0].lr, ss.stages[0].batch_size, ss.stages[0].epochs) == (3e-4, 32, 3)
