"""The task-agnostic training loop: epochs of SGD steps, EMA, checkpoints, exact resume, stop on signal.

A task supplies ``compute_loss(model, batch) -> StepOutput`` (and optionally an ``evaluate(model)``
returning metrics); :func:`fit` does the rest. train_cls, train_multibox and train_det share it.

Exact resume: a checkpoint records the epoch, the number of steps done within it, the RNG states
and the partial epoch sums; :class:`~backbone.runtime.loader.ResumableLoader` replays the rest of
the epoch's batches unchanged, so an interrupted and resumed run reproduces an uninterrupted one
bit for bit (on CPU with deterministic algorithms and a fixed thread count).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from backbone.runtime.checkpoint import (
    StopRequest,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from backbone.runtime.config import config_diff
from backbone.runtime.dist import all_reduce_sum, any_rank, barrier, get_world_size, is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader
from backbone.runtime.log import MetricsWriter, Progress, plot_curves
from backbone.runtime.precision import MixedPrecision

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLoss(UserError):
    """A batch gave a NaN or infinite loss: the run stops before the update reaches the weights."""


@dataclass
class StepOutput:
    """What a task's loss function returns for one batch."""

    loss: torch.Tensor  # scalar to backpropagate
    batch_size: int  # images on this rank
    metrics: dict[str, float] = field(default_factory=dict)  # batch means, logged and averaged


class Averager(Protocol):
    """The EMA interface the loop needs (backbone.ema.ModelEma)."""

    module: nn.Module

    def update(self, model: nn.Module, step: int) -> None: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class EpochOutcome:
    steps_done: int  # steps completed within the epoch (including those before a resume)
    global_step: int
    sums: dict[str, float]  # batch-size-weighted metric sums plus "count" (this rank)
    stopped: bool
    images: int  # images this rank processed in this call (not counting steps before a resume)
    data_seconds: float  # time spent waiting for batches
    step_seconds: float  # time spent in forward, backward and update


@dataclass
class FitResult:
    epoch: int  # epochs completed (a stopped run is part-way through epoch ``epoch``)
    global_step: int
    stopped: bool
    stop_reason: str | None
    last_metrics: dict[str, Any]


def train_epoch(
    model: nn.Module,
    batches: Iterable[Any],
    compute_loss: Callable[[nn.Module, Any], StepOutput],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    epoch: int,
    steps_per_epoch: int,
    start_step: int = 0,
    global_step: int = 0,
    sums: Mapping[str, float] | None = None,
    ema: Averager | None = None,
    stop: StopRequest | None = None,
    max_steps: int | None = None,
    grad_clip_norm: float | None = None,
    precision: MixedPrecision | None = None,
    log_interval: int = 20,
    metrics: MetricsWriter | None = None,
    desc: str = "train",
) -> EpochOutcome:
    """Run the remaining steps of one epoch; return early (``stopped``) when a stop is requested."""
    model.train()
    precision = precision or MixedPrecision("fp32", torch.device("cpu"))
    sums = dict(sums or {})
    interval: dict[str, float] = {}
    step = start_step
    data_seconds = step_seconds = 0.0
    world_size = get_world_size()
    progress = Progress(batches, total=steps_per_epoch, initial=start_step, desc=desc, world_size=world_size)
    stopped = False
    images = 0
    tick = time.perf_counter()
    for batch in progress:
        loaded = time.perf_counter()
        with precision.autocast():
            out = compute_loss(model, batch)
        # Checked before backward so a bad batch never reaches the weights, the EMA or a checkpoint.
        loss_value = float(out.loss.detach())
        if any_rank(not math.isfinite(loss_value)):
            raise NonFiniteLoss(
                f"non-finite loss ({_describe_loss(loss_value, out.metrics)}) at {desc}, batch "
                f"{step + 1} of {steps_per_epoch} (global step {global_step + 1}, on this or another rank)"
            )
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(out.loss, optimizer, model.parameters(), grad_clip_norm)
        lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step()
        step += 1
        global_step += 1
        if ema is not None:
            ema.update(model, global_step)
        done = time.perf_counter()
        images += out.batch_size
        data_seconds += loaded - tick
        step_seconds += done - loaded

        values = {"loss": loss_value, **out.metrics}
        for acc in (sums, interval):
            acc["count"] = acc.get("count", 0.0) + out.batch_size
            for key, value in values.items():
                acc[key] = acc.get(key, 0.0) + value * out.batch_size
        progress.update(out.batch_size, loss=values["loss"], lr=lr)
        if metrics is not None and (step % log_interval == 0 or step == steps_per_epoch):
            count = interval.pop("count")
            record = {k: v / count for k, v in interval.items()}
            metrics.write(
                {
                    "kind": "train",
                    "epoch": epoch,
                    "step": global_step,
                    "epoch_float": epoch + step / steps_per_epoch,
                }
                | record
                | {"lr": lr, "images_per_s": progress.images_per_second()}
            )
            interval.clear()

        if max_steps is not None and global_step >= max_steps and stop is not None:
            stop.request("max_steps")
        if step < steps_per_epoch and stop is not None and any_rank(stop.requested):
            stopped = True
            break
        tick = time.perf_counter()
    progress.close()
    return EpochOutcome(step, global_step, sums, stopped, images, data_seconds, step_seconds)


def _describe_loss(loss: float, metrics: Mapping[str, float]) -> str:
    parts = [f"loss {loss:.4g}"] + [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)]
    return ", ".join(parts)


def training_checkpoint(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: Averager | None,
    epoch: int,
    step: int,
    global_step: int,
    loader: ResumableLoader,
    config: Mapping[str, Any],
    epoch_sums: Mapping[str, float],
    precision: MixedPrecision | None = None,
) -> dict[str, Any]:
    """The plain-dict checkpoint that :func:`fit` writes (loadable with weights_only=True)."""
    return {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "config": dict(config),
        "rng": capture_rng_state(),
        "sampler": {
            "seed": loader.seed,
            "num_replicas": loader.sampler.num_replicas,
            "batch_size": loader.batch_size,
            "start_index": step * loader.batch_size,
        },
        "epoch_sums": dict(epoch_sums),
        "grad_scaler": precision.state_dict() if precision is not None else None,
    }


def restore_training(
    checkpoint: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: Averager | None,
    loader: ResumableLoader,
    source: str,
    precision: MixedPrecision | None = None,
) -> None:
    """Load every piece of state saved by :func:`training_checkpoint`, RNG last."""
    sampler = checkpoint["sampler"]
    if checkpoint["step"] > 0 and (
        sampler["num_replicas"] != loader.sampler.num_replicas or sampler["batch_size"] != loader.batch_size
    ):
        raise UserError(
            f"{source}: saved mid-epoch with {sampler['num_replicas']} process(es) x batch "
            f"{sampler['batch_size']}; resume with the same (now {loader.sampler.num_replicas} x "
            f"{loader.batch_size}) or from an end-of-epoch checkpoint"
        )
    unwrap_model(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if ema is not None:
        if checkpoint.get("ema") is None:
            raise UserError(f"{source}: checkpoint has no EMA weights but this run uses EMA")
        ema.load_state_dict(checkpoint["ema"])
    if precision is not None:
        precision.load_state_dict(checkpoint.get("grad_scaler"))
    restore_rng_state(checkpoint["rng"])


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: ResumableLoader,
    compute_loss: Callable[[nn.Module, Any], StepOutput],
    epochs: int,
    run_dir: str | Path,
    config: Mapping[str, Any],
    ema: Averager | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    eval_every: int = 1,
    log_interval: int = 20,
    grad_clip_norm: float | None = None,
    precision: str = "fp32",
    max_steps: int | None = None,
    keep_every: int = 0,
    final_eval: bool = True,
) -> FitResult:
    """Train for ``epochs`` epochs, evaluating (the EMA model if any) and checkpointing each epoch.

    Writes ``run_dir/checkpoint.pt`` (every epoch and when stopped by SIGTERM/SIGINT or
    ``max_steps``; also ``checkpoint_epochNNN.pt`` every ``keep_every`` epochs), ``metrics.jsonl``
    and ``curves.png``. With ``resume``, continues from ``run_dir/checkpoint.pt``. ``precision``
    (fp32, bf16, fp16) sets the autocast of the training forward pass (backbone.runtime.precision);
    ``evaluate`` chooses its own. ``final_eval=False`` leaves the last epoch's evaluation to the
    caller (who evaluates something made after training, such as fitted extras).
    """
    run_dir = Path(run_dir)
    mixed_precision = MixedPrecision(precision, next(model.parameters()).device)
    ckpt_path = run_dir / CHECKPOINT_NAME
    start_epoch, start_step, global_step, sums = 0, 0, 0, {}
    if resume:
        ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
        if ckpt is None:
            raise UserError(f"{ckpt_path}: no checkpoint to resume from")
        changed = config_diff(ckpt.get("config") or {}, dict(config))
        if changed:
            logger.warning("resuming with a changed config: %s", ", ".join(changed))
        restore_training(
            ckpt,
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema=ema,
            loader=train_loader,
            source=str(ckpt_path),
            precision=mixed_precision,
        )
        start_epoch, start_step, global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        sums = dict(ckpt.get("epoch_sums") or {})
        logger.info("resumed from %s: epoch %d, step %d", ckpt_path, start_epoch, start_step)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", keep_until_step=global_step if resume else None)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(
            f"training set too small: {len(train_loader.dataset)} images give no full batch of "
            f"{train_loader.batch_size} per process"
        )
    last: dict[str, Any] = {}

    def save(epoch: int, step: int, epoch_sums: Mapping[str, float]) -> None:
        if is_main_process():
            state = training_checkpoint(
                model=model,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                ema=ema,
                epoch=epoch,
                step=step,
                global_step=global_step,
                loader=train_loader,
                config=config,
                epoch_sums=epoch_sums,
                precision=mixed_precision,
            )
            save_checkpoint(ckpt_path, state)
            if step == 0 and keep_every > 0 and epoch % keep_every == 0:
                save_checkpoint(run_dir / f"checkpoint_epoch{epoch:03d}.pt", state)
        barrier()

    with StopRequest() as stop, _name_last_checkpoint(ckpt_path):
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            outcome = train_epoch(
                model,
                train_loader.epoch_batches(epoch, start_step),
                compute_loss,
                optimizer,
                lr_scheduler,
                epoch=epoch,
                steps_per_epoch=steps_per_epoch,
                start_step=start_step,
                global_step=global_step,
                sums=sums,
                ema=ema,
                stop=stop,
                max_steps=max_steps,
                grad_clip_norm=grad_clip_norm,
                precision=mixed_precision,
                log_interval=log_interval,
                metrics=metrics,
                desc=f"epoch {epoch + 1}/{epochs}",
            )
            global_step = outcome.global_step
            if outcome.stopped:
                save(epoch, outcome.steps_done, outcome.sums)
                logger.info(
                    "stopped (%s) at epoch %d step %d/%d; checkpoint %s (continue with --resume)",
                    stop.signal_name,
                    epoch + 1,
                    outcome.steps_done,
                    steps_per_epoch,
                    ckpt_path,
                )
                return FitResult(epoch, global_step, True, stop.signal_name, last)
            totals = all_reduce_sum(outcome.sums)
            count = max(totals.pop("count", 0.0), 1.0)
            seconds = time.perf_counter() - started
            last = {"kind": "epoch", "epoch": epoch + 1, "step": global_step, "epoch_float": float(epoch + 1)}
            last |= {f"train_{k}": v / count for k, v in totals.items()}
            # Throughput of this session's steps (all ranks), and the share of time spent waiting for data.
            images_per_s = (
                outcome.images * get_world_size() / max(outcome.data_seconds + outcome.step_seconds, 1e-9)
            )
            last |= {"epoch_seconds": seconds, "train_images_per_s": images_per_s}
            last["data_wait_fraction"] = outcome.data_seconds / max(
                outcome.data_seconds + outcome.step_seconds, 1e-9
            )
            final = epoch + 1 == epochs
            if evaluate is not None and (final_eval if final else (epoch + 1) % eval_every == 0):
                eval_model = ema.module if ema is not None else unwrap_model(model)
                last |= {f"val_{k}": v for k, v in evaluate(eval_model).items()}
            metrics.write(last)
            plot_curves(metrics.path, run_dir / "curves.png")
            logger.info("epoch %d/%d: %s", epoch + 1, epochs, _summary(last))
            save(epoch + 1, 0, {})
            start_step, sums = 0, {}
            if any_rank(stop.requested) and epoch + 1 < epochs:
                logger.info(
                    "stopped (%s) after epoch %d; checkpoint %s", stop.signal_name, epoch + 1, ckpt_path
                )
                return FitResult(epoch + 1, global_step, True, stop.signal_name, last)
    if not last and evaluate is not None and final_eval:  # resumed a finished run: report the final metrics
        eval_model = ema.module if ema is not None else unwrap_model(model)
        last = {f"val_{k}": v for k, v in evaluate(eval_model).items()}
    return FitResult(max(epochs, start_epoch), global_step, False, None, last)


@contextlib.contextmanager
def _name_last_checkpoint(ckpt_path: Path) -> Iterator[None]:
    """Add to a NonFiniteLoss message where the last good state is and how to continue from it."""
    try:
        yield
    except NonFiniteLoss as exc:
        if ckpt_path.is_file():
            where = f"the last good checkpoint {ckpt_path} is kept (lower the learning rate, then --resume)"
        else:
            where = "no checkpoint was written yet (lower the learning rate and start again)"
        raise NonFiniteLoss(f"{exc}; {where}") from None


def _summary(record: Mapping[str, Any]) -> str:
    keys = [k for k in record if k.startswith(("train_", "val_"))] + ["epoch_seconds"]
    return ", ".join(f"{k} {record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float)))
