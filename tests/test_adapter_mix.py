"""A `cat` mix written from adapter files (for engines that load adapters from disk, like vLLM) equals PEFT's
own in-memory `add_weighted_adapter(..., "cat")`."""

from __future__ import annotations

import json

import pytest
import torch

from specialize.models import attach_adapters, load_model, write_cat_mix


def test_cat_mix_from_files_equals_peft_in_memory(tmp_path, tiny_model_dir, tiny_adapters):
    mix = write_cat_mix(dict(tiny_adapters), [0.7, -0.4], tmp_path / "mix")
    cfg = json.loads((mix / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 + 8  # ranks 4 and 8 stacked, scaling 1
    model, _ = load_model(str(tiny_model_dir), dtype="float32", threads=1)
    model = attach_adapters(model, {**tiny_adapters, "from_files": mix})
    model.add_weighted_adapter(["alpha", "beta"], [0.7, -0.4], "in_memory", combination_type="cat")
    ids = torch.tensor([[5, 17, 30, 2, 9, 44, 12, 8]])
    logits = {}
    with torch.inference_mode():
        for name in ("from_files", "in_memory", "alpha"):
            model.set_adapter(name)
            logits[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(logits["from_files"], logits["in_memory"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["from_files"], base) and not torch.allclose(logits["from_files"], logits["alpha"])


def test_cat_mix_refuses_what_it_cannot_reproduce(tmp_path, tiny_adapters):
    with pytest.raises(ValueError, match="one weight per source"):
        write_cat_mix(dict(tiny_adapters), [1.0], tmp_path / "a")
    patterned = tmp_path / "patterned"
    patterned.mkdir()
    cfg = json.loads((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    (patterned / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 2}}))
    (patterned / "adapter_model.safetensors").write_bytes(
        (tiny_adapters["alpha"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="per-layer ranks"):
        write_cat_mix({"p": patterned, "beta": tiny_adapters["beta"]}, [1.0, 1.0], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written
