"""backbone.runtime.checkpoint: atomic writes, safe loading, RNG round trip, stop on signal."""

from __future__ import annotations

import argparse
import os
import random
import signal

import numpy as np
import pytest
import torch

from backbone.runtime.checkpoint import (
    StopRequest,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from backbone.runtime.errors import UserError


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, handle):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)  # the old checkpoint is intact ...
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # ... and no temporary file is left


def test_load_rejects_pickled_objects_and_garbage(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": argparse.Namespace(a=1)}, path)  # needs pickle's arbitrary-class loading
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path)  # weights_only=True refuses arbitrary classes
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_stop_request_catches_sigterm_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_second_sigint_interrupts_immediately():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
