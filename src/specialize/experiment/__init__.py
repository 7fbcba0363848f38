"""Experiments: grids of train/eval runs with a content-hash cache, a results store and reports."""
