"""Training configs: a run is a model, a method and an ordered list of stages, each with its own data mix."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specialize.config import Method, ModelConfig, Scheduler, TemplateName, load_config
from specialize.train.mixing import SourceSpec


class LoraSettings(BaseModel):
    """LoRA hyperparameters; defaults are Self-Specialization's (r 8, alpha 16, every linear layer)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    # the paper gives no dropout; 0 also skips 7 full-activation dropouts per layer (~35% of a CPU step)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class StageSettings(BaseModel):
    """How one stage trains: every hyperparameter, without its data (an experiment declares these once per
    stage and takes the data from the grid point)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1, description="examples per optimizer step, over all processes")
    micro_batch_size: int = Field(
        8, ge=1, description="rows per forward pass on one process: one example each, or with `pack` as many "
        "examples as fit in max_length tokens (either way at most micro_batch_size x max_length tokens)",
    )  # fmt: skip
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Scheduler = "cosine"
    max_length: int = Field(1024, ge=8)
    max_grad_norm: float | None = Field(1.0, gt=0)


class StageConfig(StageSettings):
    """One stage of the curriculum (e.g. generalist, then specialist): its settings and its data mix."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sources: list[SourceSpec] = Field(min_length=1)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    method: Method = "lora"
    lora: LoraSettings = LoraSettings()
    template: TemplateName = "alpaca"
    stages: list[StageConfig] = Field(min_length=1)
    output_dir: str = "runs/train"
    seed: int = 0
    save_every: int = Field(50, ge=0, description="optimizer steps between checkpoints; 0 = none")
    keep_checkpoints: int = Field(2, ge=1)
    merge: bool = Field(False, description="also write base + adapter merged into one safetensors model")
    compile: bool = Field(False, description="torch.compile the decoder")
    pack: bool = Field(
        True, description="pack several examples into each row (each attends only to itself, same loss): no padding "
        "compute; off, or a model that does not read packed rows, gives one padded example per row",
    )  # fmt: skip
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    progress: bool = True

    @model_validator(mode="after")
    def _unique_stage_names(self) -> TrainConfig:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self


PRESETS = ("two_stage_lima", "two_stage_alpaca_gpt4", "self_specialization_lora")


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return Path(str(resources.files("specialize.train") / "presets" / f"{name}.yaml"))


def load_train_config(path_or_preset: str, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file or a shipped preset name, plus `key.sub=value` overrides."""
    path = preset_path(path_or_preset) if path_or_preset in PRESETS else Path(path_or_preset)
    return load_config(TrainConfig, path, overrides)


def self_specialization_config(
    data: str | Path,
    *,
    model: ModelConfig,
    output_dir: str | Path,
    stage: StageSettings | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> TrainConfig:
    """Kang et al.'s tuning of a specialist on a synth run's `data.jsonl`: the `self_specialization_lora`
    preset (the paper's settings, `overrides` applied), with its stage's hyperparameters replaced by `stage` and
    its top-level fields by `fields` when given. `specialize synth --train` and the experiment runner both call
    this, so the two train the same way."""
    cfg = load_train_config("self_specialization_lora", overrides)
    preset = cfg.stages[0]
    hyper = (stage or preset).model_dump(include=set(StageSettings.model_fields))
    only = StageConfig(name=preset.name, sources=[SourceSpec(name="synthetic", path=str(data))], **hyper)
    return TrainConfig.model_validate(
        {**cfg.model_dump(), **fields, "model": model, "output_dir": str(output_dir), "stages": [only]}
    )
