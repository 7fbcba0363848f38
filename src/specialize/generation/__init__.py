"""Text generation: one token loop (`loop.py`) that every consumer drives, offline (`batch.py`) or serving."""

from specialize.generation.batch import generate, generate_mixture, run_requests
from specialize.generation.loop import (
    FinishReason,
    Output,
    Request,
    TokenLoop,
    contrastive,
    marginalize,
    retrieval_weights,
)
from specialize.generation.params import SamplingParams

__all__ = [
    "FinishReason",
    "Output",
    "Request",
    "SamplingParams",
    "TokenLoop",
    "contrastive",
    "generate",
    "generate_mixture",
    "marginalize",
    "retrieval_weights",
    "run_requests",
]
