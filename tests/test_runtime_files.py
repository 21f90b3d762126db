"""backbone.runtime.files: the one atomic write behind checkpoints, model files and proposal shards."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone import googlenet
from backbone.runtime import files
from backbone.runtime.checkpoint import save_checkpoint
from backbone.runtime.files import atomic_torch_save, atomic_write, atomic_write_text
from backbone.weights import save_model
from detect.proposals.cache import write_shard


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask_not_mkstemp(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
    expected = 0o666 & ~mask
    assert mode_of(tmp_path / "a.txt") == expected
    assert mode_of(tmp_path / "b.pt") == expected
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives, for comparison
    assert mode_of(plain) == expected


def test_every_writer_goes_through_it_and_gets_the_umask_mode(tmp_path: Path, umask) -> None:
    umask(0o022)
    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    save_model(tmp_path / "model.pt", googlenet("bn", num_classes=2, aux_logits=False))
    boxes = np.zeros((1, 4), np.float32)
    write_shard(tmp_path / "shard_00000.npz", "abc", np.array([1]), [(boxes, np.ones(1), 0.5)])
    for name in ("checkpoint.pt", "model.pt", "shard_00000.npz"):
        assert mode_of(tmp_path / name) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "model.pt", "shard_00000.npz"]


def test_content_round_trips_and_the_parent_is_created(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "new" / "dir" / "t.txt", "grüße\n")
    assert (tmp_path / "new" / "dir" / "t.txt").read_text(encoding="utf-8") == "grüße\n"
    atomic_write(tmp_path / "b.bin", lambda handle: handle.write(b"\x00\x01"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.arange(3))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old\n")

    def broken(handle) -> None:
        handle.write(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_an_interrupt_also_removes_the_temporary(tmp_path: Path) -> None:
    def interrupted(handle) -> None:
        handle.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "g.txt", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_data_and_directory_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write_text(tmp_path / "h.txt", "x")
    assert calls == ["fsync-file", "replace", "fsync-dir"]
