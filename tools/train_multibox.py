"""Train the class-agnostic MultiBox proposal head on a train_cls GoogLeNet.

    python tools/train_multibox.py --config configs/det/multibox_fruit_raccoon.yaml [--set train.epochs=5]
        [--out DIR] [--resume] [--max-steps N]
    torchrun --nproc_per_node=2 tools/train_multibox.py --config ...

The backbone comes from ``model.init`` (a ``model.pt`` written by train_cls; ``null`` starts from
random weights, which the exported model's meta then says). Priors are k-means centres of the
training boxes. The run directory (default ``runs/<config stem>``) receives config.yaml,
metrics.jsonl, curves.png, log.txt, checkpoint.pt (every epoch and on SIGTERM/SIGINT; ``--resume``
continues exactly), best.pt (the best validated epoch so far), summary.json and model.pt, the file
tools/propose.py reads.

model.pt holds the evaluated epoch with the best validation recall at the largest
``train.recall_top_k`` (not the last epoch: training can end worse than it started); its meta says
which epoch, its recall, and the recall of the k-means priors alone (what an untrained head
predicts). When no epoch beat the priors the best epoch is still exported, since its ranking is
learned and the priors' is not, but the log, summary.json (``beat_priors``) and the meta say so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from backbone.runtime import config as cfglib
from backbone.runtime.dist import is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader, build_eval_loader
from backbone.runtime.log import run_tool
from backbone.runtime.optim import build_lr_scheduler, lr_factor_fn
from backbone.runtime.run import Run, start_run, stop_exit_code, wrap_ddp, write_summary
from backbone.runtime.trainer import StepOutput, fit
from detect.datasets import DetectionRecord
from detect.datasets.spec import DatasetSpec
from detect.proposals.multibox import MultiBoxArch, MultiBoxNet, kmeans_priors, save_multibox
from detect.proposals.multibox_best import BestEpoch, compare_with_priors, prior_counts, priors_recall
from detect.proposals.multibox_data import MultiBoxDataset, all_gt_boxes, collate_multibox
from detect.proposals.multibox_train import (
    build_model,
    build_optimizer,
    evaluate_multibox,
    load_backbone,
    load_records,
    multibox_step,
    split_train_val,
)

logger = logging.getLogger("train_multibox")


@dataclass(frozen=True)
class DataConfig:
    train: tuple[DatasetSpec, ...] = ()
    val_fraction: float = 0.1  # held out of the training images for validation
    split_seed: int = 0
    image_size: int = 224
    cache_shorter_side: int = 256
    workers: int = 0
    eval_batch_size: int = 32


@dataclass(frozen=True)
class ModelConfig:
    init: str | None = None  # train_cls model.pt; None: random init (recorded in the model's meta)
    variant: Literal["paper", "bn", "torchvision"] = "bn"  # only used without init
    stage: str = "inception5b"
    freeze_through: str | None = None  # backbone stages up to this one are frozen
    num_priors: int = 200
    reduced_channels: int = 128
    grid: int = 7
    dropout: float = 0.3
    prior_seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
    kind: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3  # head; the backbone gets lr * backbone_lr_factor
    backbone_lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16  # per process
    alpha: float = 0.3  # weight of the localisation term (Erhan et al.)
    match: Literal["predictions", "priors"] = "predictions"  # what |l - g| is measured from
    warmup_epochs: float = 0.5
    grad_clip_norm: float | None = 10.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: faster steps on an AVX512-BF16 CPU
    eval_every: int = 1
    log_interval: int = 10
    recall_top_k: tuple[int, ...] = (10, 50, 200)


@dataclass(frozen=True)
class TrainMultiBoxConfig:
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (bit-exact resume on CPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch intra-op threads per process (None: torch's default)
    channels_last: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return cfglib.add_run_args(parser)


def main(args: argparse.Namespace) -> int:
    cfg = cfglib.load_config(args.config, TrainMultiBoxConfig, args.overrides)
    with start_run(
        args,
        cfg,
        "train_multibox",
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        threads=cfg.threads,
        device=cfg.device,
    ) as run:
        return train(cfg, args, run)


def open_data(data: DataConfig) -> tuple[list[DetectionRecord], list[DetectionRecord]]:
    """The training records split into train and val, with the config keys in the errors."""
    if not data.train:
        raise UserError("data.train: no training data set given")
    records = load_records(data.train)  # a data set that cannot be read is a DatasetError (UserError)
    try:
        return split_train_val(records, data.val_fraction, data.split_seed)
    except ValueError as err:
        raise UserError(f"data.{err}") from None


def make_model(
    cfg: ModelConfig, priors: np.ndarray, image_size: int
) -> tuple[MultiBoxNet, MultiBoxArch, dict]:
    backbone, trained_from = load_backbone(cfg.init, cfg.variant)  # WeightsError: a UserError
    try:
        model, arch = build_model(
            backbone,
            priors,
            image_size=image_size,
            stage=cfg.stage,
            num_priors=cfg.num_priors,
            reduced_channels=cfg.reduced_channels,
            grid=cfg.grid,
            dropout=cfg.dropout,
            freeze_through=cfg.freeze_through,
        )
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    return model, arch, trained_from


def train(cfg: TrainMultiBoxConfig, args: argparse.Namespace, run: Run) -> int:
    train_records, val_records = open_data(cfg.data)
    gt = all_gt_boxes(train_records)
    if len(gt) == 0:
        raise UserError("data.train: the training images hold no ground-truth boxes")
    priors = kmeans_priors(gt, cfg.model.num_priors, seed=cfg.model.prior_seed)
    logger.info(
        "%d train / %d val images, %d boxes -> %d priors",
        len(train_records),
        len(val_records),
        len(gt),
        len(priors),
    )
    data = cfg.data
    train_ds = MultiBoxDataset(train_records, data.image_size, True, data.cache_shorter_side)
    val_ds = MultiBoxDataset(val_records, data.image_size, False, data.cache_shorter_side)
    train_loader = ResumableLoader(
        train_ds, cfg.train.batch_size, seed=cfg.seed, num_workers=data.workers, collate_fn=collate_multibox
    )
    val_loader = build_eval_loader(val_ds, data.eval_batch_size, data.workers, collate_fn=collate_multibox)

    model, arch, trained_from = make_model(cfg.model, priors, data.image_size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(run.device, memory_format=memory_format)
    optim = cfg.optim
    optimizer = build_optimizer(
        model, optim.kind, optim.lr, optim.backbone_lr_factor, optim.momentum, optim.weight_decay
    )
    factor = lr_factor_fn(
        "cosine", len(train_loader) or 1, cfg.train.epochs, warmup_epochs=cfg.train.warmup_epochs
    )
    lr_scheduler = build_lr_scheduler(optimizer, factor)
    match_priors = model.head.priors if cfg.train.match == "priors" else None
    top_ks = tuple(k for k in cfg.train.recall_top_k if k <= cfg.model.num_priors) or (cfg.model.num_priors,)

    priors_val = priors_recall(priors, prior_counts(priors, gt), val_ds.targets, top_ks)
    logger.info("k-means priors alone (commonest first): %s", percents(priors_val))
    key = f"recall@{max(top_ks)}"  # what model selection compares
    best = BestEpoch(run.dir, key, resume=args.resume)
    step = multibox_step(run.device, cfg.train.alpha, match_priors, cfg.channels_last)
    trained = {"epoch": cfg.train.epochs}  # the epoch fit last trained; as is when resuming a finished run

    def compute_loss(train_model: torch.nn.Module, batch: Any) -> StepOutput:
        trained["epoch"] = train_loader.sampler.epoch + 1
        return step(train_model, batch)

    def run_eval(eval_model: torch.nn.Module) -> dict[str, float]:
        metrics = evaluate_multibox(
            eval_model, val_loader, run.device, cfg.train.alpha, match_priors, top_ks, cfg.channels_last
        )
        best.update(eval_model, metrics, trained["epoch"])  # fit evaluates at the end of an epoch
        return metrics

    config_dict = cfglib.config_to_dict(cfg)
    result = fit(
        model=wrap_ddp(model, run),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_loader=train_loader,
        compute_loss=compute_loss,
        epochs=cfg.train.epochs,
        run_dir=run.dir,
        config=config_dict,
        evaluate=run_eval,
        resume=args.resume,
        eval_every=cfg.train.eval_every,
        log_interval=cfg.train.log_interval,
        grad_clip_norm=cfg.train.grad_clip_norm,
        precision=cfg.train.precision,
        max_steps=args.max_steps,
    )
    code = stop_exit_code(result)
    if code is not None:
        return code
    if not is_main_process():
        return 0
    beat, verdict = compare_with_priors(key, best.epoch, cfg.train.epochs, best.metrics, priors_val)
    last_val = {k[4:]: v for k, v in result.last_metrics.items() if k.startswith("val_")}
    model.load_state_dict(best.weights())
    meta = {
        "trained_from": trained_from,
        "epoch": best.epoch,  # of cfg.train.epochs
        "selected_by": f"val {key}",
        "val": best.metrics,
        "priors_val": priors_val,
        "beat_priors": beat,
        "last_epoch_val": last_val,
        "config": config_dict,
        "num_train_images": len(train_ds),
    }
    save_multibox(run.dir / "model.pt", model, arch, meta)
    logger.info("exported %s: %s", run.dir / "model.pt", verdict)
    if not beat:
        logger.warning(
            "training did not beat the k-means priors; model.pt holds its best epoch (%d) all the same, "
            "as its ranking is learned and the priors' is not; a lower optim.lr, more epochs or a "
            "stronger model.init may do better",
            best.epoch,
        )
    summary = {"epochs": result.epoch, "steps": result.global_step, **result.last_metrics}
    summary |= {"best_epoch": best.epoch, "best_val": best.metrics, "priors_val": priors_val}
    write_summary(run, summary | {"beat_priors": beat, "trained_from": trained_from}, resume=args.resume)
    return 0


def percents(metrics: dict[str, float]) -> str:
    return ", ".join(f"val {k} {v:.1f}%" for k, v in metrics.items() if k.startswith("recall"))


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
