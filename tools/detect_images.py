"""Detect objects in images with a trained detector (or an ensemble of them).

    python tools/detect_images.py --checkpoint RUN/model.pt [--checkpoint RUN2/model.pt] IMAGE_OR_FOLDER ...
        [--out runs/detect] [--score-threshold 0.3] [--nms-iou 0.3] [--max-per-image 100]
        [--device auto|cpu|cuda] [--flip] [--precision fp32|bf16|fp16]

Proposes boxes as the model was trained (selective search, plus MultiBox when the model file names
one), classifies them and writes ``--out``/<image stem>.png (detections drawn with scores above
``--draw-threshold``; a repeated stem gets a numbered suffix) and ``--out``/detections.json
(COCO-style: file_name, bbox [x, y, w, h], category, score). Unreadable files are skipped, listed
and counted; the exit code is 1 when any were.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from backbone.image_io import ImageDecodeError, read_image_rgb
from backbone.runtime.dist import select_device
from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write_text
from backbone.runtime.log import run_tool, setup_logging
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
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
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
    results, skipped = [], []
    bar = tqdm(files, desc="detect", unit="img", dynamic_ncols=True)
    for path, picture in zip(bar, output_names(files), strict=True):
        try:
            image = read_image_rgb(path)
        except ImageDecodeError as err:
            skipped.append(f"{err.path}: {err.problem}")
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
    for line in skipped:
        logger.warning("skipped %s", line)
    print(
        f"{len(files) - len(skipped)} images, {len(results)} detections -> {args.out}; {len(skipped)} skipped"
    )
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
