"""Serving: one base model, many LoRA specialists, an OpenAI-compatible API."""
