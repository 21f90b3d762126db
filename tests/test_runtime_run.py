"""backbone.runtime.run: the run skeleton of the training tools (guard, seeding, config dump, ends)."""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from backbone.runtime import config as cfglib
from backbone.runtime.errors import UserError
from backbone.runtime.run import Run, start_run, stop_exit_code, wrap_ddp, write_summary
from backbone.runtime.trainer import FitResult


@dataclass(frozen=True)
class Section:
    lr: float = 0.1
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Cfg:
    seed: int = 3
    section: Section = field(default_factory=Section)


def parse(*argv: str) -> argparse.Namespace:
    return cfglib.add_run_args(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture(autouse=True)
def _restore_globals():
    """start_run sets process-wide state: threads, deterministic mode, log handlers."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_backbone_handler", False):
            root.removeHandler(handler)
            handler.close()


def test_fresh_run_writes_config_and_log_and_yields_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = cfglib.load_config(None, Cfg, ["section.lr=0.5"])
    with start_run(parse("--out", str(out)), cfg, "tool", seed=cfg.seed, device="cpu", threads=1) as run:
        assert isinstance(run, Run)
        assert run.dir == out and run.device == run.info.device == torch.device("cpu")
        assert run.info.world_size == 1 and torch.get_num_threads() == 1
        logging.getLogger("tool").info("inside the run")
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "seed": 3,
        "section": {"lr": 0.5, "sizes": [1, 2]},
    }
    log = (out / "log.txt").read_text()
    assert f"run directory {out}; 1 process(es) on cpu" in log and "inside the run" in log


def test_default_directory_is_runs_slash_config_stem_or_tool(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with start_run(parse(), Cfg(), "my_tool", seed=0, device="cpu") as run:
        assert run.dir == Path("runs") / "my_tool"
    config = tmp_path / "exp1.yaml"
    config.write_text("seed: 1\n")
    with start_run(parse("--config", str(config)), Cfg(), "my_tool", seed=0, device="cpu") as run:
        assert run.dir == Path("runs") / "exp1"
    assert (tmp_path / "runs" / "exp1" / "config.yaml").is_file()


def test_guard_checkpoint_needs_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"old")
    guard = pytest.raises(UserError, match="exists: pass --resume to continue or --overwrite")
    with guard, start_run(parse("--out", str(out)), Cfg(), "tool", seed=0, device="cpu"):
        pytest.fail("the body must not run")
    assert not (out / "config.yaml").exists()  # refused before anything was written
    for flag in ("--resume", "--overwrite"):
        with start_run(parse("--out", str(out), flag), Cfg(), "tool", seed=0, device="cpu") as run:
            assert run.dir == out


def test_guard_resume_without_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "nothing"
    guard = pytest.raises(UserError, match="no checkpoint to resume from")
    with guard, start_run(parse("--out", str(out), "--resume"), Cfg(), "tool", seed=0, device="cpu"):
        pytest.fail("the body must not run")
    assert not out.exists()


def draws() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_python_numpy_and_torch_are_seeded(tmp_path: Path) -> None:
    results = []
    for i in range(2):
        random.seed(100 + i)  # different state before each run: the run's seed decides
        np.random.seed(100 + i)
        torch.manual_seed(100 + i)
        with start_run(parse("--out", str(tmp_path / f"r{i}")), Cfg(), "tool", seed=7, device="cpu"):
            results.append(draws())
    assert results[0] == results[1]
    with start_run(parse("--out", str(tmp_path / "other")), Cfg(), "tool", seed=8, device="cpu"):
        assert draws() != results[0]


def test_deterministic_mode_when_asked(tmp_path: Path) -> None:
    torch.use_deterministic_algorithms(False)
    with start_run(parse("--out", str(tmp_path / "a")), Cfg(), "tool", seed=0, device="cpu"):
        assert not torch.are_deterministic_algorithms_enabled()
    with start_run(
        parse("--out", str(tmp_path / "b")), Cfg(), "tool", seed=0, deterministic=True, device="cpu"
    ):
        assert torch.are_deterministic_algorithms_enabled()


def test_wrap_ddp_is_the_model_itself_in_one_process(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with start_run(parse("--out", str(tmp_path / "r")), Cfg(), "tool", seed=0, device="cpu") as run:
        assert wrap_ddp(model, run) is model


@pytest.mark.parametrize(
    ("stopped", "reason", "code"),
    [(False, None, None), (True, "max_steps", 0), (True, "SIGTERM", 143), (True, "SIGINT", 130)],
)
def test_stop_exit_code(stopped: bool, reason: str | None, code: int | None) -> None:
    result = FitResult(epoch=1, global_step=5, stopped=stopped, stop_reason=reason, last_metrics={})
    assert stop_exit_code(result) == code


def test_summary_is_replaced_but_resume_keeps_earlier_keys(tmp_path: Path) -> None:
    run = Run(tmp_path, None, torch.device("cpu"))  # type: ignore[arg-type] (write_summary needs dir only)
    write_summary(run, {"initial_val": {"loss": 2.0}, "epochs": 1, "path": tmp_path}, resume=False)
    first = json.loads((tmp_path / "summary.json").read_text())
    assert first == {"initial_val": {"loss": 2.0}, "epochs": 1, "path": str(tmp_path)}
    write_summary(run, {"epochs": 3, "val_loss": 1.0}, resume=True)
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "initial_val": {"loss": 2.0},
        "epochs": 3,
        "path": str(tmp_path),
        "val_loss": 1.0,
    }
    write_summary(run, {"epochs": 4}, resume=False)  # a fresh run forgets the old summary
    assert json.loads((tmp_path / "summary.json").read_text()) == {"epochs": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
