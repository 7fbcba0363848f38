"""ruff is part of the contract: the tree stays lint-clean and formatted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_and_format():
    paths = [p for p in ("src", "tests", "benchmarks") if (REPO / p).exists()]
    check = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *paths], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
