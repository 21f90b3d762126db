"""train_cls under torchrun with 2 CPU processes (gloo): the same numbers as 1 process, and a worker
killed mid-run is restarted by torchrun's elastic agent and resumes from the last checkpoint.

All runs train GoogLeNet ``paper`` without aux heads and with dropout 0: BatchNorm normalises over
each rank's own batch (8 images, not 16) and dropout draws from each rank's own RNG, both real
differences of method between 1 and 2 processes; without them only floating-point summation order
differs. (test_train_cls.py covers the default ``bn`` model under torchrun.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tool_loader import load_tool

from backbone.engine import evaluate
from backbone.runtime import config as cfglib
from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.loader import build_eval_loader
from backbone.runtime.log import read_metrics
from backbone.weights import load_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/cls/synthetic_tiny.yaml"
# 48 images: 3 steps per epoch of 16 images, as 1 x batch 16 or 2 ranks x batch 8.
SETTINGS = [
    "data.image_size=32", "data.synthetic_train_size=48", "data.synthetic_val_size=20",
    "train.epochs=2", "data.workers=0", "data.eval_batch_size=8", "threads=1", "train.log_interval=1",
    "deterministic=true", "model.variant=paper", "model.aux_logits=false", "model.dropout=0.0",
]  # fmt: skip
# Same global batches, no BatchNorm or dropout: 1 and 2 processes differ only in the order floats are
# summed (DDP averages two half-batch gradients), ~1e-7 here after 6 steps; 1e-5 leaves room.
TOLERANCE = 1e-5


def args(*settings: str) -> list[str]:
    return ["--config", CONFIG, *(arg for s in [*SETTINGS, *settings] for arg in ("--set", s))]


def launch(*tool_args: str, processes: int = 1, max_restarts: int = 0) -> subprocess.Popen:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--max-restarts", str(max_restarts), "--rdzv-backend", "c10d"]
        launcher += ["--rdzv-endpoint", "localhost:0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [*launcher, "tools/train_cls.py", *tool_args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: a timed-out run is ended whole
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    return output


def child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of ``parent``'s child process whose environment says RANK=rank (torchrun's workers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError):  # the process ended meanwhile
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def assert_same_weights(a: dict, b: dict, tolerance: float) -> float:
    """Largest absolute difference between the model and EMA tensors of two checkpoints."""
    worst = 0.0
    for key in ("model", "ema"):
        for name, value in a[key].items():
            worst = max(worst, (value.double() - b[key][name].double()).abs().max().item())
    assert worst <= tolerance, worst
    return worst


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun") / "two"
    finish(launch(*args("train.batch_size=8"), "--out", str(out), processes=2))
    return out


def test_two_processes_train_like_one_within_tolerance(two_process_run, tmp_path):
    one = tmp_path / "one"
    finish(launch(*args("train.batch_size=16", "train.keep_every=1"), "--out", str(one)))
    one_process = load_checkpoint(one / "checkpoint.pt")
    two_processes = load_checkpoint(two_process_run / "checkpoint.pt")
    assert one_process["global_step"] == two_processes["global_step"] == 6
    assert_same_weights(one_process, two_processes, TOLERANCE)
    # Not a vacuous agreement: the second epoch alone moves the weights 100x further than that.
    after_epoch_1 = load_checkpoint(one / "checkpoint_epoch001.pt")["model"]
    moved = max((one_process["model"][k] - v).abs().max().item() for k, v in after_epoch_1.items())
    assert moved > 100 * TOLERANCE
    # Epoch records sum over ranks (per-step "train" records show rank 0's half batch only).
    epochs = [
        [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
        for run in (one, two_process_run)
    ]
    assert [r["step"] for r in epochs[0]] == [r["step"] for r in epochs[1]] == [3, 6]
    for a, b in zip(*epochs, strict=True):
        for key in ("train_loss", "train_top1", "val_loss", "val_top5"):
            assert b[key] == pytest.approx(a[key], abs=TOLERANCE), (a["epoch"], key)
        assert (a["val_top1"], a["val_count"]) == (b["val_top1"], b["val_count"])


def test_evaluation_split_over_two_ranks_equals_one_process(two_process_run, monkeypatch):
    # Each rank scored half of the 20 images; scoring all of them here must give the same numbers.
    monkeypatch.chdir(REPO)
    tool = load_tool("train_cls")
    cfg = cfglib.load_config(Path(CONFIG), tool.TrainClsConfig, [*SETTINGS, "train.batch_size=8"])
    _, val_ds, _, _ = tool.build_data(cfg)
    model, _ = load_model(two_process_run / "model.pt")  # the EMA weights the run evaluated
    single = evaluate(model, build_eval_loader(val_ds, 8), torch.device("cpu"), cfg.channels_last)
    recorded = [r for r in read_metrics(two_process_run / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    assert recorded["val_count"] == single["count"] == 20
    assert recorded["val_top1"] == single["top1"] and recorded["val_top5"] == single["top5"]
    # Other batch shapes (10 images per rank vs 8+8+4) may round differently in the convolutions.
    assert recorded["val_loss"] == pytest.approx(single["loss"], abs=TOLERANCE)


def test_a_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(two_process_run, tmp_path):
    out = tmp_path / "killed"
    proc = launch(*args("train.batch_size=8"), "--out", str(out), processes=2, max_restarts=1)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = child_with_rank(proc.pid, rank=1)
    assert victim is not None, "rank 1 not found after the first checkpoint"
    os.kill(victim, signal.SIGKILL)
    finish(proc)
    log = (out / "log.txt").read_text()
    assert "torchrun restart 1: continuing from" in log
    resumed = re.findall(r"resumed from \S+: epoch (\d+), step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0][0]) > 0
    # Deterministic and resumed exactly (same batches, restored RNG): tolerance 0, bit for bit.
    assert_same_weights(
        load_checkpoint(out / "checkpoint.pt"), load_checkpoint(two_process_run / "checkpoint.pt"), 0.0
    )
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    uninterrupted = [r for r in read_metrics(two_process_run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["val_loss"] for r in epochs] == [r["val_loss"] for r in uninterrupted]
