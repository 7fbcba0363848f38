"""specialize: carve a specialist LLM out of a generalist one."""

__version__ = "0.1.0"
