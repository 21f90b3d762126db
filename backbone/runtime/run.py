"""The run skeleton every training tool shares (train_cls, train_multibox, train_det).

``start_run`` guards the run directory, starts torch.distributed when under torchrun, seeds every
generator, writes the resolved config and starts logging; the tool then builds its data and
model and calls ``backbone.runtime.trainer.fit``. ``stop_exit_code`` and ``write_summary`` end it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backbone.runtime import config as cfglib
from backbone.runtime.dist import DistInfo, cleanup_distributed, init_distributed, is_main_process
from backbone.runtime.errors import UserError, WriteError
from backbone.runtime.files import atomic_write_text, remove_leftover_temporaries, saving
from backbone.runtime.log import setup_logging
from backbone.runtime.paths import default_run_dir
from backbone.runtime.trainer import CHECKPOINT_NAME, FitResult

logger = logging.getLogger(__name__)


@dataclass
class Run:
    dir: Path
    info: DistInfo
    device: torch.device


def run_directory(args: argparse.Namespace, tool: str) -> Path:
    """``--out`` or ``runs/<config stem>``, checked against ``--resume`` / ``--overwrite``."""
    run_dir = Path(args.out) if args.out is not None else default_run_dir(args.config, tool)
    checkpoint = run_dir / CHECKPOINT_NAME
    if elastic_restart() > 0 and checkpoint.is_file():
        # torchrun restarted the workers after one failed: continue from the run's last checkpoint,
        # as torchrun asks of a script, whichever of --resume / --overwrite the first attempt had.
        args.resume = True
    if args.resume and not checkpoint.is_file():
        raise UserError(f"{checkpoint}: no checkpoint to resume from")
    if not args.resume and not args.overwrite and checkpoint.exists():
        raise UserError(f"{checkpoint} exists: pass --resume to continue or --overwrite to start over")
    return run_dir


def elastic_restart() -> int:
    """How often torchrun's elastic agent has restarted the workers (0: first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; deterministic algorithms, or cudnn's autotuner on CUDA."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def start_run(
    args: argparse.Namespace,
    cfg: Any,
    tool: str,
    *,
    seed: int,
    deterministic: bool = False,
    threads: int | None = None,
    device: str = "auto",
) -> Iterator[Run]:
    """Set up a training run and yield it; torch.distributed is shut down again on exit.

    In order: the run-directory guard (a checkpoint without ``--resume`` / ``--overwrite``, or
    ``--resume`` without one, is a UserError, raised before anything is created), the process group
    and device (``init_distributed(device)``), ``threads`` intra-op threads, python / numpy / torch
    seeded with ``seed`` (deterministic algorithms when ``deterministic``, else cudnn.benchmark on
    CUDA), then on rank 0 the run directory with the resolved ``cfg`` in ``config.yaml``, logging
    to ``log.txt``, one line naming the directory, process count and device, and the removal of
    temporaries that killed atomic writes left in the directory. After torchrun's elastic agent
    restarts the workers, they resume from the run directory's checkpoint. A failed
    save (WriteError) is re-raised naming the checkpoint that still loads. ``args`` is what
    ``config.add_run_args`` parses (.config, .out, .resume, .overwrite, .max_steps); ``tool`` names
    the default directory ``runs/<tool>`` when there is no config file.
    """
    run_dir = run_directory(args, tool)
    info = init_distributed(device)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        seed_everything(seed, deterministic)
        if is_main_process():
            with saving(run_dir / "config.yaml"):
                run_dir.mkdir(parents=True, exist_ok=True)
                cfglib.dump_config(cfg, run_dir / "config.yaml")
        with saving(run_dir / "log.txt"):
            setup_logging(run_dir)
        logger.info("run directory %s; %d process(es) on %s", run_dir, info.world_size, info.device)
        if is_main_process():  # a kill -9 during a save leaves its temporary, up to a checkpoint's size
            remove_leftover_temporaries(run_dir)
        if elastic_restart() > 0 and args.resume:
            checkpoint = run_dir / CHECKPOINT_NAME
            logger.info("torchrun restart %d: continuing from %s", elastic_restart(), checkpoint)
        try:
            yield Run(run_dir, info, info.device)
        except WriteError as exc:
            raise _name_last_checkpoint(exc, run_dir / CHECKPOINT_NAME) from None
    finally:
        cleanup_distributed()


def _name_last_checkpoint(error: WriteError, checkpoint: Path) -> WriteError:
    """Add to a failed save where the last good state is: atomic writes leave the previous file whole."""
    if not checkpoint.is_file():
        note = "no checkpoint was saved yet"
    else:
        which = "the previous checkpoint" if Path(error.path) == checkpoint else "the checkpoint"
        note = f"{which} {checkpoint} still loads (--resume continues from it)"
    return WriteError(f"{error}; {note}", path=error.path)


def wrap_ddp(model: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel under torchrun (one device per process on CUDA), else the model."""
    if run.info.world_size <= 1:
        return model
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def stop_exit_code(result: FitResult) -> int | None:
    """128 + signal number for a run stopped by a signal, 0 for ``--max-steps``, None if it finished."""
    if not result.stopped:
        return None
    signum = getattr(signal, result.stop_reason or "", None)
    return 128 + int(signum) if signum is not None else 0


def write_summary(run: Run, summary: Mapping[str, Any], resume: bool) -> None:
    """Rank 0 writes ``summary.json``; on resume, keys of the earlier summary not given again stay."""
    if not is_main_process():
        return
    path = run.dir / "summary.json"
    old = json.loads(path.read_text(encoding="utf-8")) if resume and path.is_file() else {}
    atomic_write_text(path, json.dumps(old | dict(summary), indent=2, default=str) + "\n")
