"""The capacity benchmark (bench/capacity.py) still runs: its --quick mode, smaller still.

A smoke test only: it checks the bench starts everything and prints its table, not the figures
(those depend on the broker's planner and on the machine).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_quick_capacity_run_prints_its_table() -> None:
    command = [sys.executable, str(ROOT / "bench" / "capacity.py"), "--quick"]
    command += ["--lifetime", "6", "--min-remaining", "2", "--lifetimes", "1", "--replicas", "2"]
    finished = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    # Budget 4 per 2 s, 6 s tokens, 2 s min_remaining: capacity 8, so 4 accounts at 50 %.
    assert "= 8 accounts" in finished.stdout
    assert "| 4 | 50% |" in finished.stdout, finished.stdout
    assert "cold start: replicas ready" in finished.stdout
