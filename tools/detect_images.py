"""Detect objects in images with a trained detector (or an ensemble of them).

    python tools/detect_images.py --checkpoint RUN/model.pt [--checkpoint RUN2/model.pt] IMAGE_OR_FOLDER ...
        [--out runs/detect] [--score-threshold 0.3] [--nms-iou 0.3] [--max-per-image 100]
        [--device auto|cpu|cuda] [--flip] [--precision fp32|bf16|fp16] [--on-bad-image skip|error]

Proposes boxes as the model was trained (selective search, plus MultiBox when the model file names
one), classifies them and writes ``--out``/<image stem>.png (detections drawn with scores above
``--draw-threshold``; a repeated stem gets a numbered suffix) and ``--out``/detections.json
(COCO-style: file_name, bbox [x, y, w, h], category, score). Bad images follow ``--on-bad-image``
(backbone/bad_images.py): by default a truncated JPEG is decoded as far as it goes and an unreadable
file is skipped, each named and counted in one summary, the exit code then being 1; ``error`` stops
at the first with one line (exit code 2). A file found in a folder that is a symlink leading out of
that folder is refused with one line before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from backbone.bad_images import ON_BAD_IMAGE, BadImages
from backbone.runtime.dist import select_device
from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write_text
from backbone.runtime.log import run_tool, setup_logging
from backbone.runtime.paths import link_escape
from detect.rcnn.predictor import Predictor
from detect.visualize import draw_boxes

logger = logging.getLogger("detect")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    parser.add_argument(
        "--checkpoint", action="append", required=True, type=Path, help="a train_det model.pt"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/detect"))
    parser.add_argument("--score-threshold", type=float, default=None, help="keep detections above (model's)")
    parser.add_argument("--nms-iou", type=float, default=None)
    parser.add_argument("--max-per-image", type=int, default=None)
    parser.add_argument("--draw-threshold", type=float, default=0.3, help="draw detections scoring above")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if any")
    parser.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=None, help="test-time flip (model's)"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="(model's)")
    parser.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default="skip",
        help="an image that does not decode: skip it (named, counted, exit code 1) or stop (exit code 2)",
    )
    return parser


def output_names(files: list[Path]) -> list[str]:
    """One picture name per input: its stem, numbered when another input has the same stem."""
    seen: dict[str, int] = {}
    names = []
    for path in files:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return names


def image_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in found:
                target = link_escape(path, item)
                if target is not None:
                    raise UserError(f"{path}: symlink leads outside the folder {item} (to {target}): refused")
            files += found
        elif item.exists():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return files


def main(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        device = select_device(args.device)
    except RuntimeError as err:
        raise UserError(f"--device: {err}") from None
    predictor = Predictor(
        args.checkpoint,
        device,
        score_threshold=args.score_threshold,
        nms_iou=args.nms_iou,
        max_per_image=args.max_per_image,
        flip=args.flip,
        precision=args.precision,
    )
    files = image_files(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    names = predictor.class_names
    category_ids = predictor.meta["category_ids"]
    results = []
    bad = BadImages(args.on_bad_image, "detect")
    bar = tqdm(files, desc="detect", unit="img", dynamic_ncols=True)
    for path, picture in zip(bar, output_names(files), strict=True):
        image = bad.read(path)
        if image is None:
            continue
        dets = predictor(image)
        for box, score, label in zip(dets["boxes"], dets["scores"], dets["labels"], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "file_name": str(path),
                    "category_id": int(category_ids[label]),
                    "category": names[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
        shown = dets["scores"] >= args.draw_threshold
        canvas = draw_boxes(image, dets["boxes"][shown], dets["labels"][shown], names, dets["scores"][shown])
        cv2.imwrite(str(args.out / f"{picture}.png"), canvas[:, :, ::-1])
    atomic_write_text(args.out / "detections.json", json.dumps(results, indent=1) + "\n")
    bad.log_summary(logger)
    skipped = bad.count("skipped")
    print(f"{len(files) - skipped} images, {len(results)} detections -> {args.out}; {skipped} skipped")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
