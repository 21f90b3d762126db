"""A full disk or a read-only run directory while train_cls saves: one line, and the last checkpoint resumes.

The faults are injected where the bytes go (backbone/runtime/files.py): ENOSPC after part of the
file is written, or EACCES when the temporary file is created. Every case checks the one-line
error (exit code 2), that no temporary file is left, and that the run resumes from its checkpoint.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tool_loader import load_tool

from backbone.runtime import files
from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.log import read_metrics, run_tool
from backbone.weights import load_model

REPO = Path(__file__).resolve().parents[1]
# 16 images / batch 8: 2 steps and 2 metrics.jsonl lines (one train, one epoch) per epoch.
TINY = [
    "--config", "configs/cls/synthetic_tiny.yaml",
    "--set", "data.image_size=32", "--set", "data.synthetic_train_size=16",
    "--set", "data.synthetic_val_size=8", "--set", "train.batch_size=8", "--set", "train.epochs=2",
    "--set", "data.workers=0", "--set", "data.eval_batch_size=8", "--set", "threads=1",
    "--set", "train.log_interval=2",
]  # fmt: skip


class FillsUp(io.FileIO):
    """A file on a disk with ``room`` bytes free: writes what fits, then fails as a full disk does."""

    def __init__(self, fd: int, mode: str, room: int) -> None:
        super().__init__(fd, mode)
        self.room = room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            super().write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(name, nth, room)``: the nth save of file ``name`` finds only ``room`` bytes free."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file a descriptor belongs to")
    real_fdopen = os.fdopen

    def arm(name: str, nth: int, room: int = 4096) -> None:
        opened = 0

        def fdopen(fd: int, mode: str = "r", *args, **kwargs):
            nonlocal opened
            base = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if base == name or base.startswith(f".{name}."):  # the file (appends) or its temporary
                opened += 1
                if opened == nth:
                    return FillsUp(fd, mode, room)
            return real_fdopen(fd, mode, *args, **kwargs)

        monkeypatch.setattr(files.os, "fdopen", fdopen)

    return arm


@pytest.fixture
def read_only_before(monkeypatch):
    """``read_only_before(directory, name, nth)``: chmod 0o555 on ``directory`` just before the nth
    save of ``name`` there. Root ignores the mode bits, so new files there are then refused as
    the kernel refuses them for everyone else; ``writable_again()`` undoes it."""
    real_mkstemp = tempfile.mkstemp
    state: dict[str, Path] = {}

    def arm(directory: Path, name: str, nth: int) -> None:
        seen = 0

        def mkstemp(*args, prefix=None, dir=None, **kwargs):
            nonlocal seen
            if dir is not None and Path(dir) == directory:
                if prefix == f".{name}.":
                    seen += 1
                    if seen == nth:
                        directory.chmod(0o555)
                        state["dir"] = directory
                if "dir" in state:
                    fd, tmp = real_mkstemp(*args, prefix=prefix, dir=dir, **kwargs)  # non-root: refused here
                    os.close(fd)
                    os.unlink(tmp)
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), tmp)
            return real_mkstemp(*args, prefix=prefix, dir=dir, **kwargs)

        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)

    def writable_again() -> None:
        if "dir" in state:
            state.pop("dir").chmod(0o755)

    arm.writable_again = writable_again
    yield arm
    writable_again()


def train(capsys, *args: str) -> tuple[int, str]:
    """train_cls in this process (so the faults apply); its exit code and stderr."""
    tool = load_tool("train_cls")
    code = run_tool(tool.main, tool.get_args_parser().parse_args([*TINY, *args]))
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, expected: str) -> None:
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {expected}"]


def temporaries(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_which_resumes(tmp_path, capsys, full_disk):
    out = tmp_path / "run"
    full_disk("checkpoint.pt", nth=2, room=64 * 1024)  # epoch 2's checkpoint: 64 KB fit of ~50 MB
    code, err = train(capsys, "--out", str(out))
    ckpt = out / "checkpoint.pt"
    assert code == 2
    assert_one_line_error(
        err,
        f"{ckpt}: no space left on device while saving; "
        f"the previous checkpoint {ckpt} still loads (--resume continues from it)",
    )
    assert temporaries(out) == [] and not (out / "model.pt").exists()
    assert load_checkpoint(ckpt)["epoch"] == 1
    code, err = train(capsys, "--out", str(out), "--resume")
    assert code == 0, err
    assert "resumed from" in err and load_checkpoint(ckpt)["epoch"] == 2
    assert load_model(out / "model.pt")[1]["image_size"] == 32


def test_read_only_run_directory_at_a_checkpoint(tmp_path, capsys, read_only_before):
    out = tmp_path / "run"
    out.mkdir()
    read_only_before(out, "checkpoint.pt", nth=2)
    code, err = train(capsys, "--out", str(out))
    ckpt = out / "checkpoint.pt"
    assert code == 2
    assert_one_line_error(
        err,
        f"{ckpt}: permission denied while saving; "
        f"the previous checkpoint {ckpt} still loads (--resume continues from it)",
    )
    read_only_before.writable_again()
    assert temporaries(out) == [] and load_checkpoint(ckpt)["epoch"] == 1
    code, err = train(capsys, "--out", str(out), "--resume")
    assert code == 0, err
    assert load_checkpoint(ckpt)["epoch"] == 2 and (out / "model.pt").is_file()


def test_full_disk_at_the_model_export_and_resume_exports_again(tmp_path, capsys, full_disk):
    out = tmp_path / "run"
    full_disk("model.pt", nth=1)
    code, err = train(capsys, "--out", str(out))
    ckpt = out / "checkpoint.pt"
    assert code == 2
    assert_one_line_error(
        err,
        f"{out / 'model.pt'}: no space left on device while saving; "
        f"the checkpoint {ckpt} still loads (--resume continues from it)",
    )
    assert temporaries(out) == [] and not (out / "model.pt").exists()
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 2
    code, err = train(capsys, "--out", str(out), "--resume")  # a finished run: evaluates and exports
    assert code == 0, err
    model, _ = load_model(out / "model.pt")
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())


def test_full_disk_at_a_metrics_append_leaves_whole_lines(tmp_path, capsys, full_disk):
    out = tmp_path / "run"
    full_disk("metrics.jsonl", nth=4, room=20)  # (1: emptied at the start) epoch 2's first record
    code, err = train(capsys, "--out", str(out))
    assert code == 2
    assert_one_line_error(
        err,
        f"{out / 'metrics.jsonl'}: no space left on device while saving; "
        f"the checkpoint {out / 'checkpoint.pt'} still loads (--resume continues from it)",
    )
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["epoch"] for line in text.splitlines()] == [0, 1]
    code, err = train(capsys, "--out", str(out), "--resume")
    assert code == 0, err
    epochs = [r["epoch"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2]


def test_a_file_where_the_run_directory_goes_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "tools/train_cls.py", *TINY, "--out", str(blocker / "x")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: {blocker / 'x' / 'config.yaml'}: cannot save, {blocker} is a file, not a directory"
    )
