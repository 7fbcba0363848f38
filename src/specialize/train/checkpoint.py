"""Training checkpoints: trainable weights (safetensors), optimizer/scheduler state and every process's RNG.

A checkpoint directory appears only when complete (written to a temporary sibling, then renamed), so a
run killed at any instant resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from specialize.io import atomic_path

PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # weights_only loading returns lists where random.getstate() had tuples
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_states: list[dict[str, Any]],
    keep: int,
) -> Path:
    """Write `root/step-NNNNNN` atomically and prune older checkpoints beyond `keep`."""
    target = root / f"{PREFIX}{step:07d}"
    with atomic_path(target, is_dir=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states},
            tmp / "state.pt",
        )
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> int:
    """Restore state in place; returns the number of optimizer steps already taken."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise RuntimeError(f"{path}: checkpoint does not match the model being trained ({missing[:3]} ...)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return json.loads((path / "meta.json").read_text())["step"]
