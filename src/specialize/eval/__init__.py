"""Evaluation: log-likelihood scoring of responses and options (more protocols arrive with the harness)."""
