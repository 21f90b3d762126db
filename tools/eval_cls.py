"""Evaluate classification checkpoints with 1, 10 or the paper's 144 crops, alone or as an ensemble.

    python tools/eval_cls.py --checkpoint runs/flowers/model.pt --crops 144
    python tools/eval_cls.py --checkpoint a/model.pt --checkpoint b/model.pt --crops 10 --data PATH

The softmax is averaged over each image's crops and then over the checkpoints. The data set and
its split default to those recorded in the (first) checkpoint, so the held-out images of training
are the ones evaluated. Writes ``eval_cls.json`` (top-1/top-5 error, per-class accuracy, confusion
matrix, timing) and ``confusion.png`` to ``--out`` (default: beside the first checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone.bad_images import ON_BAD_IMAGE
from backbone.cls_eval import EnsembleMember, classification_report, predict_ensemble, save_confusion_png
from backbone.data import SPLITS, build_classification_datasets
from backbone.runtime import UserError, resolve_data_path, run_tool, setup_logging
from backbone.runtime.files import atomic_write, atomic_write_text
from backbone.transforms import CROP_COUNTS, MultiCropTransform
from backbone.weights import load_model

logger = logging.getLogger("eval_cls")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", action="append", required=True, type=Path, help="model file (repeat: ensemble)"
    )
    parser.add_argument("--crops", type=int, choices=CROP_COUNTS, default=1, help="crops per image")
    parser.add_argument(
        "--data", help="data set root, or 'synthetic'; default: the checkpoint's training data"
    )
    parser.add_argument("--split", choices=SPLITS, help="default: the checkpoint's")
    parser.add_argument("--val-fraction", type=float, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, help="split seed; default: the checkpoint's")
    parser.add_argument("--val-labels", help="label file for a flat val folder (ILSVRC)")
    parser.add_argument("--image-size", type=int, help="crop size; default: each checkpoint's training size")
    parser.add_argument(
        "--batch-size", type=int, help="images per batch (default: about 256 crops per batch)"
    )
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument(
        "--limit", type=int, help="evaluate only this many images, spread evenly over the set"
    )
    parser.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default="skip",
        help="an image that does not decode: skip it (named, counted) or stop (backbone/bad_images.py)",
    )
    parser.add_argument("--no-fuse", action="store_true", help="do not fold BatchNorm for inference")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast: about 1.5x faster end to end with AVX512-BF16"
    )
    parser.add_argument(
        "--save-probs",
        action="store_true",
        help="also write probs.npz: labels, each model's and the ensemble's",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: <first checkpoint dir>/eval_<N>crop)"
    )
    return parser


def load_models(paths: list[Path]) -> list[tuple[Path, torch.nn.Module, dict[str, Any]]]:
    models = []
    for path in paths:
        model, meta = load_model(path, aux_logits=False)  # WeightsError: a UserError naming the file
        models.append((path, model, meta))
    first_names = models[0][2].get("class_names")
    for path, _, meta in models[1:]:
        if meta.get("class_names") != first_names:
            raise UserError(f"{path}: its class names differ from those of {paths[0]}; cannot ensemble")
    return models


def data_settings(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """Command line first, then the checkpoint's recorded data settings, then the defaults."""
    recorded = meta.get("data") or {}
    data = args.data if args.data is not None else recorded.get("root")
    root = None if data in (None, "synthetic") else resolve_data_path(data)
    if root is not None and not root.is_dir():
        raise UserError(f"{root}: data set folder not found (pass --data)")
    pick = lambda arg, key, default: arg if arg is not None else recorded.get(key, default)  # noqa: E731
    return {
        "root": root,
        "split": pick(args.split, "split", "auto"),
        "val_fraction": pick(args.val_fraction, "val_fraction", 0.2),
        "seed": pick(args.seed, "seed", 0),
        "val_labels": pick(args.val_labels, "val_labels", None),
        "dedupe": recorded.get("dedupe", True),
        "synthetic_train_size": recorded.get("synthetic_train_size", 8000),
        "synthetic_val_size": recorded.get("synthetic_val_size", 1600),
    }


def image_size_of(args: argparse.Namespace, path: Path, meta: dict[str, Any]) -> int:
    size = args.image_size or meta.get("image_size")
    if not size:
        raise UserError(f"{path}: checkpoint records no image_size; pass --image-size")
    return int(size)


def main(args: argparse.Namespace) -> int:
    setup_logging()
    evaluate_checkpoints(args)
    return 0


def evaluate_checkpoints(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation, write JSON + PNG, print the summary; returns what the JSON holds."""
    models = load_models(args.checkpoint)
    first_path, _, first_meta = models[0]
    settings = data_settings(args, first_meta)
    crop_size = image_size_of(args, first_path, first_meta)
    try:
        _, val_ds, class_names = build_classification_datasets(
            image_size=crop_size,
            on_bad_image=args.on_bad_image,
            val_transform=MultiCropTransform(crop_size, args.crops),
            **settings,
        )
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    recorded_names = first_meta.get("class_names")
    if recorded_names is not None and list(recorded_names) != list(class_names):
        raise UserError(
            f"{first_path}: trained on classes {recorded_names[:5]}..., the data has {class_names[:5]}..."
        )
    for path, model, _ in models:
        if model.num_classes != len(class_names):
            raise UserError(
                f"{path}: the model has {model.num_classes} classes, the data set {len(class_names)}"
            )
    indices = None
    if args.limit is not None and args.limit < len(val_ds):
        indices = np.unique(np.linspace(0, len(val_ds) - 1, args.limit).round().astype(int)).tolist()
    num_images = len(val_ds) if indices is None else len(indices)
    logger.info("%d images, %d crops each, %d checkpoint(s)", num_images, args.crops, len(models))

    start = time.perf_counter()
    members = [EnsembleMember(path, model, image_size_of(args, path, meta)) for path, model, meta in models]
    ensemble = predict_ensemble(  # a bad image under --on-bad-image error is a BadImageError: a UserError
        members,
        val_ds,
        class_names,
        args.crops,
        indices=indices,
        batch_size=args.batch_size,
        workers=args.workers,
        fuse=not args.no_fuse,
        bf16=args.bf16,
        keep_member_probs=args.save_probs,  # per-model probabilities are kept only to be saved
    )
    probs, labels = ensemble.probs, ensemble.labels
    report = classification_report(probs, labels, class_names)
    result = {
        "crops": args.crops,
        "precision": "bf16" if args.bf16 else "fp32",
        "checkpoints": ensemble.members,
        "data_root": str(settings["root"]) if settings["root"] else "synthetic",
        "seconds": time.perf_counter() - start,
        **report,
    }
    out = args.out or first_path.parent / f"eval_{args.crops}crop"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval_cls.json", json.dumps(result, indent=2) + "\n")
    if args.save_probs:
        arrays = {f"model_{i}": p for i, p in enumerate(ensemble.member_probs)}
        ensemble_probs = probs.astype(np.float32)
        atomic_write(
            out / "probs.npz",
            lambda handle: np.savez_compressed(handle, labels=labels, ensemble=ensemble_probs, **arrays),
        )
    title = f"{len(models)} model(s), {args.crops} crop(s): top-1 error {report['top1_error']:.2f}%"
    save_confusion_png(np.asarray(report["confusion_matrix"]), class_names, out / "confusion.png", title)
    top5 = f", top-5 error {report['top5_error']:.2f}%" if "top5_error" in report else ""
    print(f"{title}{top5} on {report['num_images']} images")
    print(f"wrote {out / 'eval_cls.json'} and {out / 'confusion.png'}")
    return result


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
