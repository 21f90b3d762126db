"""Detect on a data set with one trained detector or an ensemble, write COCO results, print per-class AP.

    python tools/test_det.py --checkpoint RUN/model.pt [--checkpoint RUN2/model.pt ...]
        [--data PATH [--names-file F] [--image-set S] [--image-root DIR] [--annotations DIR]
         [--classes A,B] [--name NAME]] [--split test]
        [--metrics voc,voc07,coco] [--nms-iou 0.3] [--max-per-image 100] [--flip] [--out DIR]
    torchrun --nproc_per_node=2 tools/test_det.py --checkpoint ...

Several checkpoints average their region softmax (the paper's ensemble); they must share classes.
Without ``--data`` the first model's validation split is used, with its proposal settings: the
cache under ``proposals.cache_dir/NAME/SPLIT`` is read, or built when missing. Writes to ``--out``
(default ``<first run>/test_<split>``): detections_<split>.json (re-score it with
tools/eval_det.py), eval_<split>.json / .txt, pr_<split>/*.png and timing.json (seconds per image).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from backbone.bad_images import ON_BAD_IMAGE
from backbone.runtime.dist import cleanup_distributed, init_distributed, is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write_text
from backbone.runtime.log import run_tool, setup_logging
from detect.datasets import class_list
from detect.datasets.spec import DatasetSpec
from detect.evaluation import METRICS
from detect.proposals.spec import spec_from_settings
from detect.rcnn.data import RegionScoringDataset
from detect.rcnn.engine import VARIANTS, InferenceSettings
from detect.rcnn.pipeline import evaluate_detector, load_split, split_proposals, write_evaluation
from detect.rcnn.predictor import load_detectors

logger = logging.getLogger("test_det")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", action="append", required=True, type=Path, help="a train_det model.pt"
    )
    parser.add_argument("--data", help="data set path (COCO json, VOC root, ILSVRC root, image+XML folder)")
    parser.add_argument("--names-file", help="--data folder layouts: split list (.csv or .txt)")
    parser.add_argument("--image-set", help="--data VOC / ILSVRC image set")
    parser.add_argument("--image-root", help="--data images folder (COCO, or an image+XML folder layout)")
    parser.add_argument("--annotations", help="--data folder layouts: the XML files' folder (default: found)")
    parser.add_argument(
        "--classes",
        type=class_list,
        help="--data VOC / folder layouts: comma-separated class names in label order",
    )
    parser.add_argument("--name", help="proposal cache name for --data (default: the folder or file stem)")
    parser.add_argument(
        "--split", default=None, help="proposal cache split name (default: val, or test with --data)"
    )
    parser.add_argument("--metrics", default=None, help=f"comma-separated of {', '.join(METRICS)}")
    parser.add_argument("--nms-iou", type=float, default=None)
    parser.add_argument("--score-threshold", type=float, default=None)
    parser.add_argument("--max-per-image", type=int, default=None)
    parser.add_argument("--region-batch", type=int, default=None)
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None, help="autocast of the region forward"
    )
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each region's scores with the mirrored image's (test-time augmentation; "
        "default: the model's test.flip)",
    )
    parser.add_argument(
        "--variants",
        default="final",
        help=f"comma-separated of {', '.join(VARIANTS)}, all from one scoring pass (final: with the "
        "extras the models carry; the others written as eval_<split>_<variant>.*)",
    )
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default=None,
        help="an image that does not decode: skip it (named, counted) or stop with an error "
        "(default: the model's data.on_bad_image, else skip)",
    )
    parser.add_argument("--no-fuse", action="store_true", help="skip BatchNorm folding (for comparison)")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(args: argparse.Namespace) -> int:
    setup_logging()
    info = init_distributed("auto")
    try:
        return test(args, info.device)
    finally:
        cleanup_distributed()


DATA_FLAGS = ("names_file", "image_set", "image_root", "annotations", "classes", "name")


def spec_from_flags(args: argparse.Namespace) -> DatasetSpec | None:
    """The ``--data`` entry; None without ``--data``, whose options are then an error, never ignored."""
    if args.data is None:
        given = [f"--{flag.replace('_', '-')}" for flag in DATA_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only used with --data (without it, the model's val split)")
        return None
    return DatasetSpec(
        args.data,
        names_file=args.names_file,
        image_set=args.image_set,
        image_root=args.image_root,
        annotations=args.annotations,
        classes=args.classes,
    )


def test(args: argparse.Namespace, device: torch.device) -> int:
    data_spec = spec_from_flags(args)
    models, meta = load_detectors(args.checkpoint, device, fuse=not args.no_fuse)
    config = meta["config"]
    data, test_cfg = config["data"], dict(config["test"])
    on_bad_image = args.on_bad_image or data.get("on_bad_image", "skip")
    if data_spec is not None:
        specs = [data_spec]
        name = args.name or Path(args.data).stem
        split_name = args.split or "test"
    else:
        specs = [DatasetSpec(**spec) for spec in data["val"]]
        name, split_name = data["name"], args.split or "val"
    split = load_split(
        specs,
        split_name,
        synthetic_root=data["synthetic_root"],
        synthetic_images=data["synthetic_val_images"],
        synthetic_image_size=data["synthetic_image_size"],
        seed=config["seed"],
        on_bad_image=on_bad_image,
    )
    if split.dataset.class_names != meta["class_names"]:
        raise UserError(
            f"{args.data or 'validation split'}: classes {split.dataset.class_names} differ from the "
            f"model's {meta['class_names']}"
        )
    spec = spec_from_settings(config["proposals"], source=f"{args.checkpoint[0]} proposals")
    boxes, _ = split_proposals(split, spec, name, on_bad_image=on_bad_image)
    overrides = {
        "nms_iou": args.nms_iou,
        "score_threshold": args.score_threshold,
        "max_per_image": args.max_per_image,
        "region_batch": args.region_batch,
    }
    test_cfg |= {k: v for k, v in overrides.items() if v is not None}
    metrics = tuple(args.metrics.split(",")) if args.metrics else tuple(test_cfg["metrics"])
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    variants = tuple(dict.fromkeys(["final", *args.variants.split(",")]))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    missing = {
        "svm": "SVMs" if not all(m.svms is not None for m in models) else None,
        "softmax+bbox": "box regression" if all(m.box_regressor is None for m in models) else None,
    }
    for variant in variants:
        if missing.get(variant):
            raise UserError(
                f"--variants {variant}: the model(s) carry no {missing[variant]} (extras.* in train_det)"
            )
    settings = InferenceSettings.from_test_config(
        test_cfg, precision=args.precision, flip=args.flip, variants=variants
    )
    dataset = RegionScoringDataset(
        split.dataset.records, boxes, data["shorter_side"], in_memory=False, on_bad_image=on_bad_image
    )
    started = time.perf_counter()
    predictions, results = evaluate_detector(models, split, dataset, settings, metrics, workers=args.workers)
    seconds = time.perf_counter() - started
    if is_main_process():
        out = args.out or args.checkpoint[0].parent / f"test_{split_name}"
        out.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            tag = split_name if variant == "final" else f"{split_name}_{variant}"
            text = write_evaluation(out, tag, split, predictions[variant], results[variant])
            print(text if variant == "final" else f"[{variant}]\n{text}")
        timing = {
            "images": len(dataset),
            "seconds": seconds,
            "seconds_per_image": seconds / max(len(dataset), 1),
            "proposals_per_image": float(boxes.counts.sum()) / max(len(boxes), 1),
            "models": [str(p) for p in args.checkpoint],
        }
        atomic_write_text(out / "timing.json", json.dumps(timing, indent=2) + "\n")
        print(
            f"{len(dataset)} images in {seconds:.1f} s ({timing['seconds_per_image']:.3f} s/img); wrote {out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
