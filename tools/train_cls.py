"""Pretrain GoogLeNet for classification with the paper's recipe.

    python tools/train_cls.py [--config configs/cls/NAME.yaml] [--set train.lr=0.05] [--out DIR] [--resume]
    torchrun --nproc_per_node=2 tools/train_cls.py --config ...

Without ``data.root`` it trains on the built-in synthetic shapes set. The run directory (default
``runs/<config stem>``) receives config.yaml (resolved), metrics.jsonl, curves.png, log.txt,
checkpoint.pt (every epoch, and on SIGTERM/SIGINT) and model.pt: the EMA (Polyak-averaged)
weights, evaluated and exported with ``backbone.weights.save_model``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from backbone import googlenet
from backbone.bad_images import OnBadImage
from backbone.data import build_classification_datasets, default_train_scale
from backbone.ema import ModelEma
from backbone.engine import batch_mix, classification_step, evaluate
from backbone.runtime import config as cfglib
from backbone.runtime.dist import is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader, build_eval_loader
from backbone.runtime.log import run_tool
from backbone.runtime.optim import build_lr_scheduler, build_optimizer, lr_factor_fn
from backbone.runtime.paths import resolve_data_path
from backbone.runtime.run import Run, start_run, stop_exit_code, wrap_ddp, write_summary
from backbone.runtime.trainer import fit
from backbone.transforms import ImageTransform, ProgressiveResizeTransform, progressive_size
from backbone.transforms import train_transform as make_train_transform
from backbone.weights import save_model

logger = logging.getLogger("train_cls")


@dataclass(frozen=True)
class ModelConfig:
    variant: Literal["paper", "bn", "torchvision"] = "bn"
    aux_logits: bool = True
    dropout: float | None = None  # None: the variant's own (0.4 paper/bn, 0.2 torchvision)


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # None: the synthetic shapes set; "$SHARED_DATA/flowers" is expanded
    image_size: int = 128
    split: Literal["auto", "folders", "stratified"] = "auto"
    val_fraction: float = 0.2
    split_seed: int = 0  # also seeds the synthetic images; augmentation follows the top-level seed
    on_bad_image: OnBadImage = "skip"  # skip (named, counted) or error: backbone/bad_images.py
    cache: bool = False  # decode every image once into RAM (small sets)
    dedupe: bool = True
    val_labels: str | None = None
    synthetic_train_size: int = 8000
    synthetic_val_size: int = 1600
    train_scale: tuple[float, float] | None = None  # crop area range; None: (0.08, 1), synthetic (0.35, 1)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range (the paper's)
    # Progressive resizing: train at min_image_size first, ramping linearly to image_size over the
    # fraction resize_ramp of the epochs (multiples of 16). Cheaper early epochs; None: off.
    min_image_size: int | None = None
    resize_ramp: tuple[float, float] = (0.0, 0.75)
    # brightness, contrast, saturation, hue (backbone.transforms.train_transform)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.05)
    workers: int = 2
    eval_batch_size: int = 64


@dataclass(frozen=True)
class OptimConfig:
    kind: Literal["sgd", "adamw"] = "sgd"  # the paper's SGD; AdamW learns faster in short runs from scratch
    lr: float = 0.1  # for the whole (global) batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    decay_norm_and_bias: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["paper", "step", "cosine", "constant"] = "paper"
    gamma: float = 0.96  # paper: x0.96 every 8 epochs; step: x gamma at each milestone
    step_epochs: float = 8.0
    milestones: tuple[float, ...] = ()
    min_factor: float = 0.0  # cosine floor, as a fraction of lr
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.1


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9998
    warmup: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32  # per process
    aux_weight: float = 0.3
    label_smoothing: float = 0.0
    # Batch-level MixUp / CutMix (Beta(alpha, alpha) mixing; 0: off; both on: one drawn per batch),
    # as torchvision's reference recipes (0.2 / 1.0 there).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    grad_clip_norm: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: ~1.8x faster steps on an AVX512-BF16 CPU
    eval_every: int = 1
    log_interval: int = 20
    keep_every: int = 0  # also keep checkpoint_epochNNN.pt every N epochs (0: only the latest)


@dataclass(frozen=True)
class TrainClsConfig:
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (bit-exact resume on CPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch intra-op threads per process (None: torch's default)
    channels_last: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return cfglib.add_run_args(parser)


def data_root(cfg: TrainClsConfig) -> Path | None:
    root = resolve_data_path(cfg.data.root) if cfg.data.root is not None else None
    if root is not None and not root.is_dir():
        raise UserError(f"data.root: data set folder not found: {root} (set SHARED_DATA or data.root)")
    return root


def check_batch_mix(train: TrainConfig) -> None:
    if train.mixup_alpha < 0 or train.cutmix_alpha < 0:
        alphas = f"{train.mixup_alpha}, {train.cutmix_alpha}"
        raise UserError(f"train.mixup_alpha and train.cutmix_alpha must be >= 0, got {alphas}")


def check_progressive_resize(data: DataConfig) -> None:
    if data.min_image_size is not None and not 0 < data.min_image_size <= data.image_size:
        raise UserError(f"data.min_image_size must be in 1..{data.image_size}, got {data.min_image_size}")
    if not 0.0 <= data.resize_ramp[0] < data.resize_ramp[1] <= 1.0:
        raise UserError(f"data.resize_ramp must satisfy 0 <= start < end <= 1, got {list(data.resize_ramp)}")


def build_data(cfg: TrainClsConfig):
    data = cfg.data
    root = data_root(cfg)
    brightness, contrast, saturation, hue = data.color_jitter
    scale = data.train_scale or default_train_scale(synthetic=root is None)

    def augmentation(size: int) -> ImageTransform:
        return make_train_transform(
            size,
            scale=scale,
            ratio=data.train_ratio,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
        )

    if data.min_image_size is None:
        train_tf = augmentation(data.image_size)
    else:
        sizes = partial(
            progressive_size,
            epochs=cfg.train.epochs,
            min_size=data.min_image_size,
            max_size=data.image_size,
            ramp=data.resize_ramp,
        )
        train_tf = ProgressiveResizeTransform(augmentation, sizes)
    try:
        train_ds, val_ds, class_names = build_classification_datasets(
            root,
            image_size=data.image_size,
            split=data.split,
            val_fraction=data.val_fraction,
            seed=data.split_seed,
            augment_seed=cfg.seed,
            on_bad_image=data.on_bad_image,
            cache=data.cache,
            dedupe=data.dedupe,
            val_labels=data.val_labels,
            synthetic_train_size=data.synthetic_train_size,
            synthetic_val_size=data.synthetic_val_size,
            train_transform=train_tf,
        )
    except (ValueError, FileNotFoundError) as exc:  # the data module's one-line "PATH: problem" errors
        raise UserError(str(exc).splitlines()[0]) from None
    meta = {
        "root": data.root,  # as configured ("$SHARED_DATA/..."), so eval_cls resolves it on its machine
        "image_size": data.image_size,
        "split": data.split,
        "val_fraction": data.val_fraction,
        "seed": data.split_seed,
        "dedupe": data.dedupe,
        "val_labels": data.val_labels,
        "synthetic_train_size": data.synthetic_train_size,
        "synthetic_val_size": data.synthetic_val_size,
    }
    return train_ds, val_ds, list(class_names), meta


def main(args: argparse.Namespace) -> int:
    cfg = cfglib.load_config(args.config, TrainClsConfig, args.overrides)
    data_root(cfg)  # fail on a missing data set or a bad setting before creating the run directory
    check_progressive_resize(cfg.data)
    check_batch_mix(cfg.train)
    with start_run(
        args,
        cfg,
        "train_cls",
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        threads=cfg.threads,
        device=cfg.device,
    ) as run:
        return train(cfg, args, run)


def train(cfg: TrainClsConfig, args: argparse.Namespace, run: Run) -> int:
    train_ds, val_ds, class_names, data_meta = build_data(cfg)
    train_loader = ResumableLoader(
        train_ds, cfg.train.batch_size, seed=cfg.seed, num_workers=cfg.data.workers, drop_last=True
    )
    val_loader = build_eval_loader(val_ds, cfg.data.eval_batch_size, num_workers=cfg.data.workers)

    model = googlenet(
        cfg.model.variant,
        num_classes=len(class_names),
        aux_logits=cfg.model.aux_logits,
        dropout=cfg.model.dropout,
    )
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(run.device, memory_format=memory_format)
    ema = ModelEma(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    optimizer = build_optimizer(
        model,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
        decay_norm_and_bias=cfg.optim.decay_norm_and_bias,
        kind=cfg.optim.kind,
    )
    sched = cfg.schedule
    factor = lr_factor_fn(
        sched.kind,
        len(train_loader) or 1,
        cfg.train.epochs,
        gamma=sched.gamma,
        step_epochs=sched.step_epochs,
        milestones=sched.milestones,
        min_factor=sched.min_factor,
        warmup_epochs=sched.warmup_epochs,
        warmup_factor=sched.warmup_factor,
    )
    lr_scheduler = build_lr_scheduler(optimizer, factor)

    def run_eval(eval_model: torch.nn.Module) -> dict[str, float]:
        return evaluate(
            eval_model, val_loader, run.device, cfg.channels_last, total=len(val_loader), desc="val"
        )

    config_dict = cfglib.config_to_dict(cfg)
    result = fit(  # a BadImageError (on_bad_image: error) is a UserError: one line, exit code 2
        model=wrap_ddp(model, run),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_loader=train_loader,
        compute_loss=classification_step(
            run.device,
            cfg.train.aux_weight,
            cfg.train.label_smoothing,
            cfg.channels_last,
            mix=batch_mix(len(class_names), cfg.train.mixup_alpha, cfg.train.cutmix_alpha),
        ),
        epochs=cfg.train.epochs,
        run_dir=run.dir,
        config=config_dict,
        ema=ema,
        evaluate=run_eval,
        resume=args.resume,
        eval_every=cfg.train.eval_every,
        log_interval=cfg.train.log_interval,
        grad_clip_norm=cfg.train.grad_clip_norm,
        precision=cfg.train.precision,
        max_steps=args.max_steps,
        keep_every=cfg.train.keep_every,
    )
    code = stop_exit_code(result)
    if code is not None:
        return code

    final_model = ema.module if ema is not None else model
    if is_main_process():
        val = {k[4:]: v for k, v in result.last_metrics.items() if k.startswith("val_")}
        meta = {
            "class_names": class_names,
            "image_size": cfg.data.image_size,
            "data": data_meta,
            "ema": ema is not None,
            "val": val,
            "config": config_dict,
        }
        save_model(run.dir / "model.pt", final_model, extra_meta=meta)
        logger.info("exported %s (val top-1 %.2f%%)", run.dir / "model.pt", val.get("top1", float("nan")))
    summary = {"epochs": result.epoch, "steps": result.global_step, **result.last_metrics}
    write_summary(run, summary, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
