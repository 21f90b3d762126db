"""tools/train_cls.py end to end on tiny synthetic data: run directory, exact resume, torchrun, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tool_loader import load_tool

from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.log import read_metrics, run_tool
from backbone.weights import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", "configs/cls/synthetic_tiny.yaml",
    "--set", "data.image_size=32", "--set", "data.synthetic_train_size=48",
    "--set", "data.synthetic_val_size=20",
    "--set", "train.batch_size=8", "--set", "train.epochs=2", "--set", "data.workers=0",
    "--set", "data.eval_batch_size=8", "--set", "threads=1", "--set", "train.log_interval=2",
]  # fmt: skip
# Deterministic, with MixUp and CutMix on: exact resume must also restore the RNG they draw from.
EXACT = [
    *TINY,
    "--set",
    "deterministic=true",
    "--set",
    "train.mixup_alpha=0.2",
    "--set",
    "train.cutmix_alpha=1.0",
]


def train_cls(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*launcher, "tools/train_cls.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """One uninterrupted tiny run in deterministic mode, shared by the tests below."""
    out = tmp_path_factory.mktemp("train_cls") / "full"
    assert_ok(train_cls(*EXACT, "--out", str(out)))
    return out


def test_tiny_run_writes_the_run_directory(full_run):
    out = full_run
    names = {p.name for p in out.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "log.txt",
        "checkpoint.pt",
        "model.pt",
        "summary.json",
    } <= names
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_count"] == 20 for r in epochs)
    assert all(r["train_loss_aux"] > 0 for r in epochs)  # the aux heads were trained
    assert any(r["kind"] == "train" and "lr" in r and "images_per_s" in r for r in records)
    model, meta = load_model(out / "model.pt")  # the exported EMA model rebuilds from its meta
    assert meta["class_names"][:2] == ["circle", "square"] and meta["image_size"] == 32 and meta["ema"]
    ema = load_checkpoint(out / "checkpoint.pt")["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert json.loads((out / "summary.json").read_text())["val_top1"] == meta["val"]["top1"]
    config_text = (out / "config.yaml").read_text()
    assert "image_size: 32" in config_text and "deterministic: true" in config_text
    assert "cutmix_alpha: 1.0" in config_text


def test_interrupted_and_resumed_run_matches_uninterrupted_bit_for_bit(full_run, tmp_path):
    # 48 images / batch 8 = 6 steps per epoch: stop in the middle of the second epoch.
    assert_ok(train_cls(*EXACT, "--out", str(tmp_path / "cut"), "--max-steps", "9"))
    partial = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (partial["epoch"], partial["step"], partial["global_step"]) == (1, 3, 9)
    assert not (tmp_path / "cut" / "model.pt").exists()
    assert_ok(train_cls(*EXACT, "--out", str(tmp_path / "cut"), "--resume"))
    full = load_checkpoint(full_run / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert resumed["global_step"] == full["global_step"] == 12
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    momentum = [s["momentum_buffer"] for s in full["optimizer"]["state"].values()]
    assert all(
        torch.equal(a, s["momentum_buffer"])
        for a, s in zip(momentum, resumed["optimizer"]["state"].values(), strict=True)
    )
    assert not torch.equal(partial["model"]["fc.weight"], resumed["model"]["fc.weight"])
    val = [
        [r["val_top1"], r["val_loss"]] for r in read_metrics(full_run / "metrics.jsonl") if "val_loss" in r
    ]
    val_cut = [
        [r["val_top1"], r["val_loss"]]
        for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")
        if "val_loss" in r
    ]
    assert val == val_cut


def test_two_process_torchrun_gloo(tmp_path):
    out = tmp_path / "ddp"
    assert_ok(train_cls(*TINY, "--set", "train.epochs=1", "--out", str(out), torchrun=2))
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    # 48 images over 2 ranks x batch 8 = 3 steps; evaluation covers each of the 20 images exactly once.
    assert epochs[-1]["step"] == 3 and epochs[-1]["val_count"] == 20
    assert (out / "model.pt").is_file() and len(list(out.glob("*.tmp"))) == 0


def test_user_error_from_the_command_line_is_one_line_exit_2(tmp_path):
    proc = train_cls(*TINY, "--set", "train.lrr=0.1", "--out", str(tmp_path / "err"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --set train.lrr=0.1: unknown key 'train.lrr' (known in train: ")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "err").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "data.root=/nonexistent/flowers"], "data set folder not found: /nonexistent/flowers"),
        (["--config", "configs/cls/missing.yaml"], "missing.yaml: config file not found"),
        (["--resume"], "no checkpoint to resume from"),
        (["--set", "data.min_image_size=64"], "data.min_image_size must be in 1..32, got 64"),
        (["--set", "data.resize_ramp=[0.5, 0.2]"], "data.resize_ramp must satisfy 0 <= start < end <= 1"),
        (["--set", "train.cutmix_alpha=-1"], "train.mixup_alpha and train.cutmix_alpha must be >= 0"),
    ],
)
def test_user_errors_in_process(tmp_path, capsys, monkeypatch, extra, message):
    tool = load_tool("train_cls")
    monkeypatch.chdir(REPO)
    args = tool.get_args_parser().parse_args([*TINY, *extra, "--out", str(tmp_path / "err")])
    assert run_tool(tool.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    tool = load_tool("train_cls")
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"old")
    args = tool.get_args_parser().parse_args([*TINY, "--out", str(out)])
    assert run_tool(tool.main, args) == 2
    assert "--resume to continue or --overwrite" in capsys.readouterr().err
