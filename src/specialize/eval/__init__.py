"""Evaluation: metrics, option ranking, tasks (YAML catalogue), the harness, and bootstrap statistics."""
