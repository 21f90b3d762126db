"""Temporaries a kill -9 leaves behind atomic writes: removed at a run's start and a cache build."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch
from test_proposals_cache import SS, write_images

from backbone.runtime import config as cfglib
from backbone.runtime.files import atomic_write, is_temporary_name, remove_leftover_temporaries
from backbone.runtime.run import start_run
from detect.proposals.cache import LEFTOVER_AGE_S, build_cache

# What a user may keep in a run directory that only looks like a temporary.
LOOK_ALIKES = ["notes.tmp", ".checkpoint.pt.tmp", ".checkpoint.pt.abc12345", "checkpoint.pt.abc12345.tmp"]


def real_temporary_name(directory: Path, target: str) -> str:
    """The name atomic_write gives its temporary, seen while it writes (so the pattern cannot drift)."""
    seen: list[str] = []

    def write(handle) -> None:
        seen.extend(p.name for p in directory.iterdir() if p.name != target)
        handle.write(b"x")

    atomic_write(directory / target, write)
    (directory / target).unlink()
    assert len(seen) == 1
    return seen[0]


def test_the_pattern_is_atomic_writes_own_names_and_no_look_alike(tmp_path: Path) -> None:
    for target in ("checkpoint.pt", "shard_00000.npz", "a.b.c"):
        name = real_temporary_name(tmp_path, target)
        assert name.startswith(f".{target}.") and is_temporary_name(name), name
    assert not any(is_temporary_name(name) for name in LOOK_ALIKES)


def test_leftovers_go_look_alikes_and_subdirectories_stay(tmp_path: Path) -> None:
    leftover = tmp_path / real_temporary_name(tmp_path, "checkpoint.pt")
    leftover.write_bytes(b"\0" * 1000)
    for name in LOOK_ALIKES:
        (tmp_path / name).write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / leftover.name).write_text("not this directory's")
    assert remove_leftover_temporaries(tmp_path) == (1, 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*LOOK_ALIKES, "sub"])
    assert (tmp_path / "sub" / leftover.name).exists()
    assert remove_leftover_temporaries(tmp_path / "missing") == (0, 0)


@pytest.fixture
def user_and_leftover_files():
    def make(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "notes.tmp").write_text("mine")
        leftover = directory / ".shard_00000.npz.k3j_9x2a.tmp"
        leftover.write_bytes(b"\0" * 2_000_000)
        return leftover

    return make


@dataclasses.dataclass(frozen=True)
class Cfg:
    seed: int = 1


def test_a_run_start_removes_its_directorys_leftovers(tmp_path: Path, user_and_leftover_files) -> None:
    out = tmp_path / "run"
    leftover = user_and_leftover_files(out)
    args = cfglib.add_run_args(argparse.ArgumentParser()).parse_args(["--out", str(out)])
    threads = torch.get_num_threads()
    try:
        with start_run(args, Cfg(), "tool", seed=1, device="cpu", threads=1):
            pass
    finally:
        torch.set_num_threads(threads)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_backbone_handler", False)]:
            root.removeHandler(handler)
            handler.close()
    assert not leftover.exists() and (out / "notes.tmp").exists()
    assert "removed 1 temporary file(s) of interrupted writes (2.0 MB)" in (out / "log.txt").read_text()


def test_a_cache_build_removes_its_directorys_leftovers(tmp_path: Path, user_and_leftover_files) -> None:
    cache = tmp_path / "cache"
    leftover = user_and_leftover_files(cache)
    old = leftover.stat().st_mtime - LEFTOVER_AGE_S - 1
    os.utime(leftover, (old, old))
    # A fresh temporary may be another job's write in progress into this same cache: kept.
    in_progress = cache / ".shard_00001.npz.a8b7c6d5.tmp"
    in_progress.write_bytes(b"\0" * 10)
    build_cache(write_images(tmp_path / "images", 1), SS, cache, workers=1, shard_size=1, progress=False)
    assert not leftover.exists() and (cache / "notes.tmp").exists() and in_progress.exists()
    assert (cache / "shard_00000.npz").is_file()
