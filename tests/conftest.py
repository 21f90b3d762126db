"""Shared fixtures: where the real data sets live, and deterministic CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP: sleeping rather than spinning at barriers. Tests start subprocesses
# (torchrun ranks, data-loader workers) beside a 2-thread main process; with spinning threads that
# oversubscription slowed GoogLeNet training steps about 20x on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Two cores are shared by the whole suite; more threads only add contention for tiny tensors.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data_dir(name: str) -> Path:
    """Path of a real data set under $SHARED_DATA, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {name!r} not found at {path} (set SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
