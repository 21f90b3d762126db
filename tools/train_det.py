"""Train GoogLeNet as the R-CNN region classifier (the paper's ILSVRC 2014 detection entry).

    python tools/train_det.py                                   # built-in synthetic scenes
    python tools/train_det.py --config configs/det/NAME.yaml [--set train.epochs=5] [--out DIR]
        [--resume] [--overwrite] [--max-steps N]
    torchrun --nproc_per_node=2 tools/train_det.py --config ...

Proposals come from the cache tools/propose.py writes (built here, with its progress bar, when
missing; a stale one is refused, naming the directory to delete so that the next run rebuilds it).
The run directory (default ``runs/<config stem>``) receives config.yaml, log.txt, metrics.jsonl,
curves.png, checkpoint.pt (exact resume), model.pt (everything inference needs), and for the
validation split detections_val.json (COCO results) and eval_val.json / eval_val.txt (per-class AP
per metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from backbone.bad_images import OnBadImage
from backbone.runtime import config as cfglib
from backbone.runtime.dist import is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader
from backbone.runtime.log import run_tool
from backbone.runtime.optim import build_lr_scheduler, lr_factor_fn
from backbone.runtime.paths import resolve_data_path
from backbone.runtime.run import start_run, stop_exit_code, wrap_ddp, write_summary
from backbone.runtime.trainer import fit
from detect.datasets.spec import DatasetSpec
from detect.proposals.spec import ProposalSpec
from detect.rcnn.build import build_detector, build_optimizer
from detect.rcnn.data import RegionScoringDataset, RegionTrainDataset, collate_regions
from detect.rcnn.engine import InferenceSettings, rcnn_step
from detect.rcnn.extras import train_box_regressor, train_svms
from detect.rcnn.model import inference_copy, save_detector
from detect.rcnn.pipeline import (
    DetectionSplit,
    evaluate_detector,
    load_split,
    split_proposals,
    write_evaluation,
)

logger = logging.getLogger("train_det")


@dataclass(frozen=True)
class ModelConfig:
    init: str | None = None  # train_cls model.pt, torchvision's googlenet-*.pth (init_kind), None: random
    init_kind: Literal["model", "torchvision"] = "model"
    variant: Literal["paper", "bn", "torchvision"] = "bn"  # only used without init
    mode: Literal["crop", "shared"] = "crop"  # crop: R-CNN warps; shared: Fast R-CNN style RoIAlign
    input_size: int = 224
    padding: int = 16  # context pixels at network scale (R-CNN's p; 0 = tight)
    warp: Literal["anisotropic", "square"] = "anisotropic"  # square: R-CNN's tightest square, keeps aspect
    trunk_stage: str = "inception4e"  # shared mode: run once per image up to here
    aux_logits: bool = True
    freeze_through: str | None = None
    sampling_ratio: int = 2


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"  # the proposal cache's directory under proposals.cache_dir
    train: tuple[DatasetSpec, ...] = ()  # empty: the built-in synthetic scenes
    val: tuple[DatasetSpec, ...] = ()
    synthetic_root: str = "runs/data/synthetic_det"
    synthetic_train_images: int = 48
    synthetic_val_images: int = 24
    synthetic_image_size: int = 160
    shorter_side: int = 480  # images are decoded at most this small side (never upscaled)
    in_memory: bool = True  # decode the training images once into RAM (small sets)
    workers: int = 0
    on_bad_image: OnBadImage = "skip"  # skip (named, counted) or error: backbone/bad_images.py


@dataclass(frozen=True)
class SamplerConfig:
    images_per_batch: int = 2  # per process; regions_per_batch is split evenly over them
    regions_per_batch: int = 128
    fg_fraction: float = 0.25  # R-CNN: 32 of 128
    fg_iou: float = 0.5
    bg_iou_low: float = 0.1  # Fast R-CNN's lower bound for background (R-CNN: 0)
    flip: bool = True
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.02)


@dataclass(frozen=True)
class OptimConfig:
    kind: Literal["sgd", "adamw"] = "sgd"  # R-CNN's SGD; AdamW for short runs from a weak start
    lr: float = 0.001  # R-CNN's fine-tuning rate, for the pretrained layers
    head_lr_mult: float = 10.0  # the new C+1-way layers
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[float, ...] = ()  # step: epochs at which lr x gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    aux_weight: float = 0.3
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip_norm: float | None = None
    eval_every: int = 1
    log_interval: int = 10


@dataclass(frozen=True)
class TestConfig:
    metrics: tuple[str, ...] = ("voc", "voc07", "coco")
    nms_iou: float = 0.3
    score_threshold: float = 0.01
    max_per_image: int = 100
    region_batch: int = 64
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of the region forward at evaluation
    flip: bool = False  # test-time augmentation: average with the mirrored image (twice the cost)


@dataclass(frozen=True)
class ExtrasConfig:
    """R-CNN's extras, fitted on the trained network (the paper's entry used neither)."""

    box_regression: bool = False
    box_iou: float = 0.6  # proposals with IoU above this train the regressor
    box_ridge: float = 1000.0
    svm: bool = False
    svm_neg_iou: float = 0.3
    svm_reg: float = 1e-3


@dataclass(frozen=True)
class TrainDetConfig:
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    channels_last: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalSpec = field(default_factory=ProposalSpec)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return cfglib.add_run_args(parser)


def inference_settings(cfg: TrainDetConfig) -> InferenceSettings:
    return InferenceSettings.from_test_config(cfg.test, channels_last=cfg.channels_last)


def open_split(data: DataConfig, split: str, seed: int) -> DetectionSplit:
    return load_split(
        data.train if split == "train" else data.val,
        split,
        synthetic_root=data.synthetic_root,
        synthetic_images=data.synthetic_train_images if split == "train" else data.synthetic_val_images,
        synthetic_image_size=data.synthetic_image_size,
        seed=seed,
        on_bad_image=data.on_bad_image,
    )


def main(args: argparse.Namespace) -> int:
    cfg = cfglib.load_config(args.config, TrainDetConfig, args.overrides)
    if cfg.sampler.regions_per_batch % cfg.sampler.images_per_batch:
        raise UserError("sampler.regions_per_batch must be a multiple of sampler.images_per_batch")
    with start_run(
        args,
        cfg,
        "train_det",
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        threads=cfg.threads,
        device=cfg.device,
    ) as run:
        return train(cfg, args, run)


def train(cfg: TrainDetConfig, args: argparse.Namespace, run) -> int:
    data = cfg.data
    train_split = open_split(data, "train", cfg.seed)
    val_split = open_split(data, "val", cfg.seed)
    if val_split.dataset.class_names != train_split.dataset.class_names:
        raise UserError(
            f"data.val: classes {val_split.dataset.class_names} differ from data.train's "
            f"{train_split.dataset.class_names}"
        )
    train_boxes, proposal_meta = split_proposals(
        train_split, cfg.proposals, data.name, on_bad_image=data.on_bad_image
    )
    val_boxes, _ = split_proposals(val_split, cfg.proposals, data.name, on_bad_image=data.on_bad_image)
    class_names = train_split.dataset.class_names
    num_classes = len(class_names)

    s = cfg.sampler
    train_ds = RegionTrainDataset(
        train_split.dataset.records,
        train_boxes,
        num_classes,
        regions_per_image=s.regions_per_batch // s.images_per_batch,
        fg_fraction=s.fg_fraction,
        fg_iou=s.fg_iou,
        bg_iou=(s.bg_iou_low, s.fg_iou),
        shorter_side=data.shorter_side,
        in_memory=data.in_memory,
        flip=s.flip,
        color_jitter=s.color_jitter,
        on_bad_image=data.on_bad_image,
    )
    val_ds = RegionScoringDataset(
        val_split.dataset.records, val_boxes, data.shorter_side, data.in_memory, data.on_bad_image
    )
    train_loader = ResumableLoader(
        train_ds, s.images_per_batch, seed=cfg.seed, num_workers=data.workers, collate_fn=collate_regions
    )

    m = cfg.model
    init = str(resolve_data_path(m.init)) if m.init is not None else None
    model, trained_from = build_detector(
        init,
        m.init_kind,
        m.variant,
        num_classes,
        mode=m.mode,
        input_size=m.input_size,
        padding=m.padding,
        warp=m.warp,
        trunk_stage=m.trunk_stage,
        aux_logits=m.aux_logits,
        sampling_ratio=m.sampling_ratio,
        freeze_through=m.freeze_through,
    )
    model = model.to(
        run.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format
    )
    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.head_lr_mult, o.momentum, o.weight_decay, o.kind)
    factor = lr_factor_fn(
        "step" if o.schedule == "step" else o.schedule,
        len(train_loader) or 1,
        cfg.train.epochs,
        gamma=o.gamma,
        milestones=o.milestones,
        warmup_epochs=o.warmup_epochs,
    )
    lr_scheduler = build_lr_scheduler(optimizer, factor)
    settings = inference_settings(cfg)
    extras_on = cfg.extras.box_regression or cfg.extras.svm
    last_eval: dict = {}

    def run_eval(eval_model, variants: tuple[str, ...] = ("final",)) -> dict[str, float]:
        """Headline metrics of each variant (the "final" one unprefixed), from one scoring pass of
        the model with BatchNorm folded."""
        predictions, results = evaluate_detector(
            [inference_copy(eval_model, cfg.channels_last)],
            val_split,
            val_ds,
            dataclasses.replace(settings, variants=variants),
            cfg.test.metrics,
            workers=data.workers,
        )
        last_eval.update(predictions=predictions["final"], results=results["final"])
        return {
            (name if variant == "final" else f"{variant}_{name}"): value
            for variant, by_metric in results.items()
            for result in by_metric.values()
            for name, value in headline(result).items()
        }

    config_dict = cfglib.config_to_dict(cfg)
    result = fit(
        model=wrap_ddp(model, run),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_loader=train_loader,
        compute_loss=rcnn_step(run.device, cfg.train.aux_weight, cfg.channels_last),
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
        final_eval=not extras_on,  # with extras, one pass after fitting them scores both
    )
    code = stop_exit_code(result)
    if code is not None:
        return code
    final_metrics = dict(result.last_metrics)
    if extras_on:
        final_metrics |= fit_extras(cfg, model, train_ds, run_eval)
    if is_main_process():
        meta = {
            "class_names": class_names,
            "category_ids": train_split.dataset.category_ids,
            "proposals": proposal_meta,
            "data": {
                "name": data.name,
                "val": [vars(spec) for spec in data.val],
                "shorter_side": data.shorter_side,
            },
            "test": cfglib.config_to_dict(cfg.test),
            "trained_from": trained_from,
            "val": {k[4:]: v for k, v in final_metrics.items() if k.startswith("val_")},
            "config": config_dict,
        }
        save_detector(run.dir / "model.pt", model, meta)
    if last_eval:
        write_evaluation(run.dir, "val", val_split, last_eval["predictions"], last_eval["results"])
    write_summary(run, {"epochs": result.epoch, "steps": result.global_step, **final_metrics}, args.resume)
    return 0


def fit_extras(cfg: TrainDetConfig, model, train_ds: RegionTrainDataset, run_eval) -> dict[str, float]:
    """Fit the configured extras on the trained model, attach them and evaluate again."""
    model.eval()
    extras = cfg.extras
    if extras.svm:
        model.svms = train_svms(
            model,
            train_ds.records,
            train_ds.proposals,
            train_ds.images,
            neg_iou=extras.svm_neg_iou,
            reg=extras.svm_reg,
            seed=cfg.seed,
            channels_last=cfg.channels_last,
        )
    if extras.box_regression:
        model.box_regressor = train_box_regressor(
            model,
            train_ds.records,
            train_ds.proposals,
            train_ds.images,
            min_iou=extras.box_iou,
            ridge=extras.box_ridge,
            channels_last=cfg.channels_last,
        )
    # One scoring pass gives the detections with the extras ("final") and without them ("softmax",
    # reported as before_extras_*).
    scored = run_eval(model, ("final", "softmax"))
    after = {
        (f"val_before_extras_{k[len('softmax_') :]}" if k.startswith("softmax_") else f"val_{k}"): v
        for k, v in scored.items()
    }
    logger.info("with extras: %s", ", ".join(f"{k} {v:.4f}" for k, v in after.items()))
    return after


def headline(result) -> dict[str, float]:
    """The numbers logged each evaluation: mAP@0.5 (VOC all-point / 11-point), COCO AP and AP50."""
    if result.metric == "coco":
        return {
            "coco_AP": result.stats.get("AP", float("nan")),
            "coco_AP50": result.stats.get("AP50", float("nan")),
        }
    return {f"mAP_{result.metric}": result.mean_ap}


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
