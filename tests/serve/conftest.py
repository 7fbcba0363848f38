"""Two random (non-zero) LoRA adapters on the tiny model, saved as adapter directories."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        # init_lora_weights=False: B is random too, so each adapter really changes the model
        cfg = LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, cfg)
        out[name] = tmp_path_factory.mktemp(name) / "adapter"
        model.save_pretrained(out[name])
    return out


@pytest.fixture
def tiny_engine(tiny_model_dir, tiny_adapters):
    from specialize.models import load_model
    from specialize.serve.engine import Engine

    model, tok = load_model(str(tiny_model_dir), threads=1)
    engine = Engine(model, tok, max_batch_size=8, batch_wait_ms=50)
    for name, path in tiny_adapters.items():
        engine.add_adapter(name, path)
    yield engine
    engine.stop()
