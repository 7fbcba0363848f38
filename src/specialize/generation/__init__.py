"""Text generation: one token loop (`loop.py`) that every consumer drives, offline (`batch.py`) or serving."""

from specialize.generation.batch import (
    generate,
    generate_mixture,
    mixture_requests,
    prompt_requests,
    run_requests,
)
from specialize.generation.loop import (
    FinishReason,
    Output,
    Request,
    TokenLoop,
    Unsupported,
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
    "Unsupported",
    "contrastive",
    "generate",
    "generate_mixture",
    "marginalize",
    "mixture_requests",
    "prompt_requests",
    "retrieval_weights",
    "run_requests",
]
