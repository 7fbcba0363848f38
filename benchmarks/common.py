"""What several benchmarks share (imported by path: each benchmark runs as a script from this directory)."""

from __future__ import annotations

from pathlib import Path

from specialize.models import EMBEDDED, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_adapters(n: int, out: Path) -> dict[str, str]:
    """n LoRA adapters (r 8, all linear layers, PEFT's default init: they cost what real adapters cost and
    change nothing) on the embedded model, saved under `out`."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(EMBEDDED)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    paths = {}
    for i in range(n):
        paths[f"spec{i}"] = str(out / f"spec{i}")
        model.save_pretrained(paths[f"spec{i}"])
    return paths
