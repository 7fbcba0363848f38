"""The serving engine over the tiny model and its two adapters (`tiny_adapters`, in the root conftest)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_engine(tiny_model_dir, tiny_adapters):
    from specialize.models import load_model
    from specialize.serve.engine import Engine

    model, tok = load_model(str(tiny_model_dir), dtype="float32", threads=1)
    engine = Engine(model, tok, max_batch_size=8, batch_wait_ms=50)
    for name, path in tiny_adapters.items():
        engine.add_adapter(name, path)
    yield engine
    engine.stop()
