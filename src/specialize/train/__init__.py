"""Instruction tuning: data mixes, two-stage curricula, full / LoRA / QLoRA, resumable, distributed."""

from specialize.train.config import LoraSettings, StageConfig, TrainConfig, load_train_config
from specialize.train.mixing import MixError, SourceSpec, build_mix
from specialize.train.sft import StageResult, TrainConfigError, run_training

__all__ = [
    "LoraSettings",
    "MixError",
    "SourceSpec",
    "StageConfig",
    "StageResult",
    "TrainConfig",
    "TrainConfigError",
    "build_mix",
    "load_train_config",
    "run_training",
]
