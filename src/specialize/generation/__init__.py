"""Text generation on top of loaded models; one sampling-parameter type for every backend."""

from specialize.generation.hf import Completion, SamplingParams, generate

__all__ = ["Completion", "SamplingParams", "generate"]
