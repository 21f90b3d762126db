"""Train the class-agnostic MultiBox proposal head on a train_cls GoogLeNet.

    python tools/train_multibox.py --config configs/det/multibox_fruit_raccoon.yaml [--set train.epochs=5]
        [--out DIR] [--resume] [--max-steps N]
    torchrun --nproc_per_node=2 tools/train_multibox.py --config ...

The backbone comes from ``model.init`` (a ``model.pt`` written by train_cls; ``null`` starts from
random weights, which the exported model's meta then says). Priors are k-means centres of the
training boxes. The run directory (default ``runs/<config stem>``) receives config.yaml,
metrics.jsonl, curves.png, log.txt, checkpoint.pt (every epoch and on SIGTERM/SIGINT; ``--resume``
continues exactly), summary.json (initial and final validation recall) and model.pt, the file
tools/propose.py reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from backbone import googlenet
from backbone.runtime import config as cfglib
from backbone.runtime.dist import all_reduce_sum, cleanup_distributed, init_distributed, is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader, build_eval_loader
from backbone.runtime.log import run_tool, setup_logging
from backbone.runtime.optim import build_lr_scheduler, lr_factor_fn
from backbone.runtime.paths import default_run_dir, resolve_data_path
from backbone.runtime.trainer import CHECKPOINT_NAME, StepOutput, fit
from backbone.weights import WeightsError, load_model
from detect.datasets import DetectionRecord
from detect.datasets.spec import DatasetSpec, open_dataset_spec
from detect.proposals.multibox import (
    MultiBoxArch,
    MultiBoxNet,
    build_multibox,
    kmeans_priors,
    multibox_loss,
    recall_at_k,
    save_multibox,
)
from detect.proposals.multibox_data import MultiBoxDataset, all_gt_boxes, collate_multibox

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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
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


def load_records(splits: tuple[DatasetSpec, ...]) -> list[DetectionRecord]:
    """All records of the listed splits, with image ids renumbered to stay unique across sets."""
    if not splits:
        raise UserError("data.train: no training data set given")
    records: list[DetectionRecord] = []
    for split in splits:
        dataset, report = open_dataset_spec(split)
        logger.info("%s: %d images; %s", split.path, len(dataset.records), report)
        for record in dataset.records:
            record.image_id = len(records) + 1
            records.append(record)
    return records


def split_train_val(records: list[DetectionRecord], fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = int(round(len(records) * fraction))
    if n_val == 0 or n_val == len(records):
        raise UserError(f"data.val_fraction {fraction} leaves no train or no val image of {len(records)}")
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def build_model(
    cfg: ModelConfig, priors: np.ndarray, image_size: int
) -> tuple[MultiBoxNet, MultiBoxArch, dict]:
    if cfg.init is not None:
        try:
            backbone, init_meta = load_model(resolve_data_path(cfg.init), aux_logits=False)
        except WeightsError as err:
            raise UserError(str(err)) from None
        trained_from = {
            "init": str(cfg.init),
            "init_val": init_meta.get("val"),
            "init_data": init_meta.get("data"),
        }
    else:
        backbone = googlenet(cfg.variant, num_classes=1, aux_logits=False)
        trained_from = {"init": None, "note": "backbone randomly initialised (no train_cls checkpoint)"}
    arch = MultiBoxArch(
        variant=backbone.variant,
        stage=cfg.stage,
        num_priors=cfg.num_priors,
        reduced_channels=cfg.reduced_channels,
        grid=cfg.grid,
        dropout=cfg.dropout,
        transform_input=backbone.transform_input,
        image_size=image_size,
    )
    try:
        model = build_multibox(backbone, priors, arch)
        model.freeze_through(cfg.freeze_through)
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    return model, arch, trained_from


def build_optimizer(model: MultiBoxNet, cfg: OptimConfig) -> torch.optim.Optimizer:
    head = [p for p in model.head.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor})
    if cfg.kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def multibox_step(device: torch.device, alpha: float, priors: torch.Tensor | None, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def compute(model: torch.nn.Module, batch) -> StepOutput:
        images, boxes = batch
        pred_boxes, logits = model(images.to(device, memory_format=memory_format))
        # Matching and loss in fp32, whatever the autocast precision of the forward pass.
        parts = multibox_loss(
            pred_boxes.float(), logits.float(), [b.to(device) for b in boxes], alpha, priors
        )
        metrics = {"loc": float(parts["loc"].detach()), "conf": float(parts["conf"].detach())}
        return StepOutput(loss=parts["loss"], batch_size=int(images.shape[0]), metrics=metrics)

    return compute


@torch.no_grad()
def evaluate_multibox(
    model,
    loader,
    device,
    alpha: float,
    priors: torch.Tensor | None,
    top_ks: tuple[int, ...],
    channels_last: bool,
):
    """Validation loss and recall of ground truth at IoU 0.5 by the top-k boxes, over all ranks."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sums = {"loss": 0.0, "images": 0.0, "boxes": 0.0} | {f"hits@{k}": 0.0 for k in top_ks}
    for images, boxes in loader:
        pred_boxes, logits = model(images.to(device, memory_format=memory_format))
        boxes = [b.to(device) for b in boxes]
        sums["loss"] += float(multibox_loss(pred_boxes, logits, boxes, alpha, priors)["loss"]) * len(images)
        sums["images"] += len(images)
        for k in top_ks:
            hits, total = recall_at_k(pred_boxes, logits, boxes, k)
            sums[f"hits@{k}"] += hits
        sums["boxes"] += sum(b.shape[0] for b in boxes)
    totals = all_reduce_sum(sums)
    out = {"loss": totals["loss"] / max(totals["images"], 1)}
    out |= {f"recall@{k}": 100.0 * totals[f"hits@{k}"] / max(totals["boxes"], 1) for k in top_ks}
    return out


def main(args: argparse.Namespace) -> int:
    cfg = cfglib.load_config(args.config, TrainMultiBoxConfig, args.overrides)
    run_dir = args.out if args.out is not None else default_run_dir(args.config, "train_multibox")
    if not args.resume and not args.overwrite and (run_dir / CHECKPOINT_NAME).exists():
        raise UserError(f"{run_dir / CHECKPOINT_NAME} exists: pass --resume to continue or --overwrite")
    info = init_distributed(cfg.device)
    try:
        return train(cfg, args, run_dir, info)
    finally:
        cleanup_distributed()


def train(cfg: TrainMultiBoxConfig, args: argparse.Namespace, run_dir: Path, info) -> int:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfglib.dump_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir)
    records = load_records(cfg.data.train)
    train_records, val_records = split_train_val(records, cfg.data.val_fraction, cfg.data.split_seed)
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

    model, arch, trained_from = build_model(cfg.model, priors, data.image_size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(info.device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    factor = lr_factor_fn(
        "cosine", len(train_loader) or 1, cfg.train.epochs, warmup_epochs=cfg.train.warmup_epochs
    )
    lr_scheduler = build_lr_scheduler(optimizer, factor)
    train_model = model
    if info.world_size > 1:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    match_priors = model.head.priors if cfg.train.match == "priors" else None
    top_ks = tuple(k for k in cfg.train.recall_top_k if k <= cfg.model.num_priors) or (cfg.model.num_priors,)

    def run_eval(eval_model: torch.nn.Module) -> dict[str, float]:
        return evaluate_multibox(
            eval_model, val_loader, info.device, cfg.train.alpha, match_priors, top_ks, cfg.channels_last
        )

    initial = run_eval(model) if not args.resume else None
    if initial is not None:
        logger.info("before training: %s", ", ".join(f"val_{k} {v:.4g}" for k, v in initial.items()))
    config_dict = cfglib.config_to_dict(cfg)
    result = fit(
        model=train_model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_loader=train_loader,
        compute_loss=multibox_step(info.device, cfg.train.alpha, match_priors, cfg.channels_last),
        epochs=cfg.train.epochs,
        run_dir=run_dir,
        config=config_dict,
        evaluate=run_eval,
        resume=args.resume,
        eval_every=cfg.train.eval_every,
        log_interval=cfg.train.log_interval,
        grad_clip_norm=cfg.train.grad_clip_norm,
        precision=cfg.train.precision,
        max_steps=args.max_steps,
    )
    if result.stopped:
        signum = getattr(signal, result.stop_reason or "", None)
        return 128 + int(signum) if signum is not None else 0
    if is_main_process():
        val = {k[4:]: v for k, v in result.last_metrics.items() if k.startswith("val_")}
        meta = {
            "trained_from": trained_from,
            "val": val,
            "config": config_dict,
            "num_train_images": len(train_ds),
        }
        save_multibox(run_dir / "model.pt", model, arch, meta)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if args.resume and summary_path.is_file() else {}
        summary = {"initial_val": initial or summary.get("initial_val"), "epochs": result.epoch}
        summary |= {"steps": result.global_step, **result.last_metrics, "trained_from": trained_from}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        logger.info(
            "exported %s (%s)", run_dir / "model.pt", ", ".join(f"{k} {v:.4g}" for k, v in val.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
