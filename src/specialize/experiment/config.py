"""An experiment: one YAML declaring models, data grids, training, evaluation and (optionally) a
self-specialization round. Lists are grid axes: generalist source x specialist amount x model x seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specialize.config import Method, ModelConfig, Retrieval, TemplateName
from specialize.eval.harness import EvalSettings
from specialize.train.config import LoraSettings, StageSettings
from specialize.train.mixing import SourceSpec


class Generalist(BaseModel):
    """One value of the generalist axis: a named source (or several) and the amount drawn from it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sources: list[SourceSpec] = Field(min_length=1)


class SecondIteration(BaseModel):
    """Kang et al. Sec. 3.5 / Table 2: generate again with a first-iteration specialist, contrasted with the base
    model (eq. 3), on the same instruction set and/or a newly written one, and tune a new LoRA on the result."""

    model_config = ConfigDict(extra="forbid")
    after: Retrieval = Field("marginalize", description="the first-iteration variant whose specialist generates")
    instructions: list[Literal["same", "new"]] = Field(default_factory=lambda: ["same", "new"], min_length=1)
    alpha: float = Field(0.1, gt=0, le=1, description="eq. 3's plausibility cutoff")


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    scale_note: str = Field("", description="how this preset is scaled down from the paper, stated honestly")
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1)
    method: Method = "lora"
    lora: LoraSettings = LoraSettings()
    template: TemplateName = "alpaca"
    data_root: str = "../shared/data"
    # grid axes
    generalists: list[Generalist | None] = Field(default_factory=lambda: [None], min_length=1,
                                                 description="null = no generalist stage")  # fmt: skip
    specialist: list[SourceSpec] = Field(default_factory=list, description="task sources (amount set by the grid)")
    amounts: list[int] = Field(default_factory=lambda: [0], description="specialist examples; 0 = generalist only")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    scale: float = Field(1.0, gt=0, description="multiplies the specialist amounts (the swept axis); generalist "
                         "sources keep their stated amount")  # fmt: skip
    generalist_stage: StageSettings = StageSettings(epochs=15, batch_size=64)
    specialist_stage: StageSettings = StageSettings(epochs=3, batch_size=128)
    eval: EvalSettings
    include_base: bool = True
    report_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="named groups of evaluated tasks (e.g. skills: factual, reasoning), each pooled into its own "
        "row of the report's table and tested in its own findings",
    )
    save_every: int = Field(20, ge=0, description="optimizer steps between training checkpoints (resume points)")
    synth: dict[str, Any] | None = Field(
        None,
        description="a self-specialization round (SynthConfig fields); a list of `retrieval` values is an axis "
        "(Table 2's top-5 marginalized / top-1 / none), its variants sharing one instruction stage",
    )
    synth_stage: StageSettings | None = Field(None, description="then tune a LoRA on the synthetic data and evaluate")
    iteration2: SecondIteration | None = Field(None, description="a second self-specialization iteration")
    variant_shots: list[int] | None = Field(
        None,
        description="the shot counts at which Table 2's variants (every retrieval after the first, iteration 2) "
        "are evaluated, a subset of eval.shots; null = all of eval.shots. Kang et al. report Table 2 at k = 0; "
        "the first variant and the base model are always evaluated at every k (Tables 1 and 4)",
    )
    output_dir: str = "runs/experiment"
    cache_dir: str | None = Field(
        None,
        description="where trained stages and evaluations are cached (content-"
        "addressed); experiments sharing it reuse each other's stages. None = output_dir",
    )

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir or self.output_dir)

    @property
    def retrievals(self) -> list[Retrieval]:
        """The first iteration's variants (one unless `synth.retrieval` is a list)."""
        value = (self.synth or {}).get("retrieval", "marginalize")
        return list(value) if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _check_iterations(self) -> ExperimentConfig:
        if (self.synth_stage is None or self.synth is None) and self.iteration2 is not None:
            raise ValueError("iteration2 needs `synth` and `synth_stage` (its specialist comes from iteration 1)")
        if self.iteration2 is not None and self.iteration2.after not in self.retrievals:
            raise ValueError(f"iteration2.after: {self.iteration2.after!r} is not one of synth.retrieval "
                             f"{self.retrievals}")  # fmt: skip
        if len(set(self.retrievals)) != len(self.retrievals):
            raise ValueError(f"synth.retrieval repeats a value: {self.retrievals}")
        if self.variant_shots is not None:
            if len(self.retrievals) < 2 and self.iteration2 is None:
                raise ValueError("variant_shots needs Table 2's variants (several synth.retrieval values or "
                                 "iteration2)")  # fmt: skip
            if not self.variant_shots or not set(self.variant_shots) <= set(self.eval.shots):
                raise ValueError(f"variant_shots: {self.variant_shots} must be a non-empty subset of eval.shots "
                                 f"{self.eval.shots} (the base model is compared at those k)")  # fmt: skip
        return self


@dataclass(frozen=True)
class RunSpec:
    """One grid point."""

    model_index: int
    generalist: Generalist | None
    amount: int
    seed: int

    @property
    def generalist_name(self) -> str:
        return self.generalist.name if self.generalist else "none"

    def run_id(self, cfg: ExperimentConfig) -> str:
        model = f"m{self.model_index}-" if len(cfg.models) > 1 else ""
        return f"{model}{self.generalist_name}-n{self.amount}-s{self.seed}"


def scaled(amount: int, scale: float) -> int:
    """A specialist amount times `scale`; 0 (generalist only) stays 0, anything else stays at least 1."""
    return 0 if amount == 0 else max(1, round(amount * scale))


def expand(cfg: ExperimentConfig) -> list[RunSpec]:
    """Every trained grid point; the base model (no generalist, amount 0) is evaluated separately."""
    runs = []
    for m, gen, amount, seed in itertools.product(range(len(cfg.models)), cfg.generalists, cfg.amounts, cfg.seeds):
        amount = scaled(amount, cfg.scale)
        if gen is None and amount == 0:
            continue
        if amount > 0 and not cfg.specialist:
            raise ValueError("amounts > 0 need `specialist` sources")
        runs.append(RunSpec(m, gen, amount, seed))
    return runs


def load_experiment(path: str | Path, overrides: list[str] | None = None, **placeholders: str) -> ExperimentConfig:
    """YAML + `key=value` overrides; `{data_root}` (and any given placeholder) is filled in every string."""
    from specialize.config import fill_placeholders, load_config

    cfg = load_config(ExperimentConfig, path, overrides)
    raw = fill_placeholders(cfg.model_dump(mode="json", exclude_unset=True), **placeholders)
    raw = fill_placeholders(raw, data_root=raw.get("data_root", cfg.data_root))
    return ExperimentConfig.model_validate(raw)
