"""tools/model_summary.py prints Table 1 computed from the model."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_model_summary_prints_table1() -> None:
    out = subprocess.run(
        [sys.executable, "tools/model_summary.py", "--variant", "paper"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = {
        line.split()[0] + " " + line.split()[1]: line
        for line in out.splitlines()
        if line.startswith("inception")
    }
    row = lines["inception (3a)"].split()
    assert (
        row[2:11] == ["28x28x256", "2", "64", "96", "128", "16", "32", "32", "159.5K"] and row[11] == "128.0M"
    )
    assert "total: 6,990,272 weights" in out
