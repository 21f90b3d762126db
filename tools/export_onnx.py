"""Export a trained classifier or detector to ONNX and check it with onnxruntime.

    python tools/export_onnx.py --checkpoint RUN/model.pt [--out DIR] [--image PATH ...]

The checkpoint is either tools/train_cls.py's model.pt (a GoogLeNet classifier) or
tools/train_det.py's (the R-CNN region classifier, format "googlenet-rcnn-v1"). BatchNorm is
folded into the convolutions first; N (the batch) is dynamic.

- classifier: DIR/classifier.onnx takes ``images`` (N, 3, S, S), normalised as by the evaluation
  transform, and gives ``logits`` (N, classes).
- detector: DIR/region_classifier.onnx takes ``regions`` (N, 3, S, S), S the model's crop size,
  proposals warped with context padding as the detector warps them, and gives ``probs``
  (N, C + 1), the softmax over the classes and background (last). Proposals, SVMs, box
  regression and NMS stay outside the file.
- shared-mode detector: also DIR/trunk.onnx (``images`` (1, 3, H, W), H and W dynamic ->
  ``features``) and DIR/region_head.onnx (``features``, ``boxes`` (R, 4) in image pixels ->
  ``probs`` (R, C + 1)): the trunk once per image, RoIAlign and the last stages per region.

The export is run on random input (batch 1 and 3) and on the given images (for a detector: crops of
each image warped as in detection) with onnxruntime and PyTorch; the largest absolute difference
is printed, and over ``--tolerance`` the tool exits with code 2. A JSON beside the ONNX file
records input size, preprocessing, class names and the measured differences; DIR defaults to the
checkpoint's folder. Needs the optional extra: pip install -e '.[export]'.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backbone import IMAGENET_MEAN, IMAGENET_STD
from backbone.export import (
    DEFAULT_OPSET,
    FirstOutput,
    check_onnx,
    export_classifier_onnx,
    onnx_session,
)
from backbone.googlenet import GoogLeNet
from backbone.image_cache import shrink_to_shorter_side
from backbone.image_io import ImageDecodeError, read_image_rgb
from backbone.runtime import UserError, run_tool, setup_logging
from backbone.runtime.files import atomic_write_text
from backbone.transforms import eval_resize_size, eval_transform
from backbone.weights import load_model, read_weights_file
from detect.rcnn.data import image_to_tensor
from detect.rcnn.export import check_shared_onnx, export_shared_onnx
from detect.rcnn.model import DETECTOR_FORMAT, RegionClassifier, load_detector

logger = logging.getLogger("export_onnx")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="model.pt from tools/train_cls.py or tools/train_det.py",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--image-size", type=int, help="classifier input size S (default: the checkpoint's)")
    parser.add_argument(
        "--image", action="append", default=[], type=Path, help="real image to check on (repeat)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest accepted max abs difference (default 1e-3)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default 17)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random check input")
    return parser


@dataclass
class Target:
    """What one checkpoint exports: the network, its reference module and how inputs are made."""

    name: str  # file stem: classifier / region_classifier
    network: GoogLeNet
    reference: nn.Module  # the unexported PyTorch model, first output (softmaxed for a detector)
    image_size: int
    input_name: str
    output_name: str
    softmax: bool
    class_names: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)  # preprocessing and notes for the JSON
    shorter_side: int | None = None  # detector: images are shrunk to this before warping
    detector: RegionClassifier | None = None

    def real_inputs(self, paths: list[Path]) -> torch.Tensor:
        if not self.softmax:
            transform = eval_transform(self.image_size)
            return torch.stack([transform(read(path)) for path in paths])
        crops = [self.warped_crops(read(path)) for path in paths]
        return torch.cat(crops)

    def warped_crops(self, image: np.ndarray) -> torch.Tensor:
        """Regions of one image warped as the detector warps proposals: the whole image, its
        centre half and its top-left quarter."""
        if self.shorter_side:
            image = shrink_to_shorter_side(image, self.shorter_side)
        h, w = image.shape[:2]
        boxes = [[0, 0, w, h], [w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0, 0, w / 2, h / 2]]
        rois = torch.tensor([[0.0, *box] for box in boxes])
        assert self.detector is not None  # softmax targets are detectors
        return self.detector.warp(image_to_tensor(image)[None], rois)


def read(path: Path) -> np.ndarray:
    try:
        return read_image_rgb(path)
    except ImageDecodeError as err:
        raise UserError(str(err)) from None


def normalisation() -> dict[str, Any]:
    return {"pixel_scale": "RGB / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def classifier_target(args: argparse.Namespace) -> Target:
    try:
        model, meta = load_model(args.checkpoint, aux_logits=False)
    except ValueError as err:  # WeightsError: one line naming the file
        raise UserError(str(err)) from None
    model.eval()
    image_size = args.image_size or meta.get("image_size")
    if not image_size:
        raise UserError(f"{args.checkpoint}: checkpoint records no image_size; pass --image-size")
    image_size = int(image_size)
    preprocessing = {
        "resize_shorter_side": eval_resize_size(image_size),
        "center_crop": image_size,
        **normalisation(),
    }
    return Target(
        "classifier", model, model, image_size, "images", "logits", False, meta.get("class_names"),
        {"preprocessing": preprocessing},
    )  # fmt: skip


def detector_target(args: argparse.Namespace) -> Target:
    try:
        detector, meta = load_detector(args.checkpoint)
    except ValueError as err:  # "PATH: problem", one line
        raise UserError(str(err)) from None
    arch = detector.arch
    if args.image_size and args.image_size != arch.input_size:
        raise UserError(
            f"{args.checkpoint}: the detector warps regions to {arch.input_size} px; "
            f"--image-size {args.image_size} does not apply"
        )
    network = detector.backbone.eval()
    shorter_side = (meta.get("data") or {}).get("shorter_side")
    notes = []
    if arch.mode == "shared":
        notes.append(
            "trained in shared mode; this file is the crop-mode network (whole network per region); "
            "trunk.onnx + region_head.onnx are the shared-mode pair"
        )
    if detector.svms is not None:
        notes.append("the detector scores with its SVMs, not exported: this file gives the network's softmax")
    if detector.box_regressor is not None:
        notes.append("box regression is not exported")
    for note in notes:
        print(f"note: {note}")
    preprocessing = {
        "image_shorter_side": shorter_side,
        "region_warp": f"{arch.warp} to {arch.input_size}x{arch.input_size}, {arch.padding} px context "
        "at that scale, outside the image the mean pixel (0 after normalisation)",
        **normalisation(),
    }
    names = meta.get("class_names")
    return Target(
        "region_classifier", network, FirstOutput(network, softmax=True), arch.input_size,
        "regions", "probs", True, [*names, "__background__"] if names else None,
        {"preprocessing": preprocessing, "mode": arch.mode, "notes": notes},
        int(shorter_side) if shorter_side else None, detector,
    )  # fmt: skip


def export_and_check_shared(
    target: Target, out: Path, args: argparse.Namespace, generator: torch.Generator
) -> dict[str, float]:
    """Shared mode: trunk.onnx + region_head.onnx, checked on a random and the given images with
    three boxes each (the whole image, its centre half, its top-left quarter)."""
    side = target.shorter_side or 2 * target.image_size
    trunk, head = export_shared_onnx(target.detector, out, (side, side + side // 3), opset=args.opset)
    print(f"exported {trunk} and {head} (shared mode: trunk once per image, head per region)")
    images = {"random image": torch.randn(1, 3, side, side + 16, generator=generator)}
    for path in args.image or []:
        image = read(path)
        image = shrink_to_shorter_side(image, target.shorter_side) if target.shorter_side else image
        images[f"shared mode, {path.name}"] = image_to_tensor(image)[None]
    differences = {}
    for name, image in images.items():
        h, w = image.shape[2:]
        boxes = torch.tensor([[0, 0, w, h], [w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0, 0, w / 2, h / 2]])
        differences[name] = check_shared_onnx(target.detector, trunk, head, image, boxes.float())
        print(f"onnxruntime vs PyTorch, {name}: max abs difference {differences[name]:.3g}")
    return differences


def main(args: argparse.Namespace) -> int:
    setup_logging()
    # Which kind of model file (read again by its loader: simpler than a loader per blob, and cheap
    # beside the export). WeightsError (a UserError) names the file.
    blob = read_weights_file(args.checkpoint)
    is_detector = isinstance(blob, dict) and blob.get("format") == DETECTOR_FORMAT
    del blob
    target = detector_target(args) if is_detector else classifier_target(args)
    model, size = target.network, target.image_size
    out = args.out if args.out is not None else args.checkpoint.parent
    path = export_classifier_onnx(
        model, out / f"{target.name}.onnx", size, opset=args.opset, softmax=target.softmax,
        input_name=target.input_name, output_name=target.output_name,
    )  # fmt: skip
    print(f"exported {path} ({model.variant}, {model.num_classes} outputs, {size}x{size} input)")

    session = onnx_session(path)
    generator = torch.Generator().manual_seed(args.seed)
    checks = {f"random batch {n}": torch.randn(n, 3, size, size, generator=generator) for n in (1, 3)}
    if args.image:
        checks[f"{len(args.image)} real image(s)"] = target.real_inputs(args.image)
    differences = {}
    for name, inputs in checks.items():
        differences[name] = check_onnx(session, target.reference, inputs)
        print(f"onnxruntime vs PyTorch, {name}: max abs difference {differences[name]:.3g}")
    if target.detector is not None and target.detector.arch.mode == "shared":
        differences |= export_and_check_shared(target, out, args, generator)
    worst = max(differences.values())
    print(f"max abs difference {worst:.3g} (tolerance {args.tolerance:g})")
    info = {
        "onnx": path.name,
        "checkpoint": str(args.checkpoint),
        "kind": "detector region classifier" if is_detector else "classifier",
        "variant": model.variant,
        "input": {"name": target.input_name, "shape": ["batch", 3, size, size]},
        "output": {"name": target.output_name, "shape": ["batch", model.num_classes]},
        **target.info,
        "class_names": target.class_names,
        "opset": args.opset,
        "max_abs_difference": differences,
        "tolerance": args.tolerance,
    }
    atomic_write_text(out / f"{target.name}.json", json.dumps(info, indent=2) + "\n")
    if worst > args.tolerance:
        raise UserError(
            f"{path}: onnxruntime and PyTorch differ by {worst:.3g}, over the tolerance {args.tolerance:g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
