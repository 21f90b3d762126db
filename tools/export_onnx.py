"""Export a trained classifier (tools/train_cls.py's model.pt) to ONNX and check it with onnxruntime.

    python tools/export_onnx.py --checkpoint runs/flowers/model.pt [--out DIR] [--image PATH ...]

BatchNorm is folded into the convolutions first; the file takes ``images`` (N, 3, S, S), normalised
as by the evaluation transform, N dynamic, and gives ``logits`` (N, classes). The export is run on
random input (batch 1 and 3) and on the given images (decoded and preprocessed as by
tools/eval_cls.py) with onnxruntime and PyTorch; the largest absolute difference is printed, and
over ``--tolerance`` the tool exits with code 2. Writes DIR/classifier.onnx and DIR/classifier.json
(input size, normalisation, class names, the measured differences); DIR defaults to the
checkpoint's folder. Needs the optional extra: pip install -e '.[export]'.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from backbone import IMAGENET_MEAN, IMAGENET_STD
from backbone.export import DEFAULT_OPSET, check_onnx, export_classifier_onnx, onnx_session
from backbone.image_io import ImageDecodeError, read_image_rgb
from backbone.runtime import UserError, run_tool, setup_logging
from backbone.transforms import eval_resize_size, eval_transform
from backbone.weights import load_model

logger = logging.getLogger("export_onnx")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="model file from tools/train_cls.py")
    parser.add_argument("--out", type=Path, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--image-size", type=int, help="input size S (default: the checkpoint's)")
    parser.add_argument(
        "--image", action="append", default=[], type=Path, help="real image to check on (repeat)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest accepted max abs difference (default 1e-3)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default 17)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random check input")
    return parser


def load_images(paths: list[Path], image_size: int) -> torch.Tensor:
    transform = eval_transform(image_size)
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(read_image_rgb(path)))
        except ImageDecodeError as err:
            raise UserError(str(err)) from None
    return torch.stack(tensors)


def main(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        model, meta = load_model(args.checkpoint, aux_logits=False)
    except ValueError as err:  # WeightsError: one line naming the file
        raise UserError(str(err)) from None
    model.eval()
    image_size = args.image_size or meta.get("image_size")
    if not image_size:
        raise UserError(f"{args.checkpoint}: checkpoint records no image_size; pass --image-size")
    image_size = int(image_size)
    out = args.out if args.out is not None else args.checkpoint.parent
    path = export_classifier_onnx(model, out / "classifier.onnx", image_size, opset=args.opset)
    print(f"exported {path} ({model.variant}, {model.num_classes} classes, {image_size}x{image_size} input)")

    session = onnx_session(path)
    generator = torch.Generator().manual_seed(args.seed)
    checks = {
        f"random batch {n}": torch.randn(n, 3, image_size, image_size, generator=generator) for n in (1, 3)
    }
    if args.image:
        checks[f"{len(args.image)} real image(s)"] = load_images(args.image, image_size)
    differences = {}
    for name, inputs in checks.items():
        differences[name] = check_onnx(session, model, inputs)
        print(f"onnxruntime vs PyTorch, {name}: max abs difference {differences[name]:.3g}")
    worst = max(differences.values())
    print(f"max abs difference {worst:.3g} (tolerance {args.tolerance:g})")
    info = {
        "onnx": path.name,
        "checkpoint": str(args.checkpoint),
        "variant": model.variant,
        "input": {"name": "images", "shape": ["batch", 3, image_size, image_size]},
        "output": {"name": "logits", "shape": ["batch", model.num_classes]},
        "preprocessing": {
            "resize_shorter_side": eval_resize_size(image_size),
            "center_crop": image_size,
            "pixel_scale": "RGB / 255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "class_names": meta.get("class_names"),
        "opset": args.opset,
        "max_abs_difference": differences,
        "tolerance": args.tolerance,
    }
    (out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if worst > args.tolerance:
        raise UserError(
            f"{path}: onnxruntime and PyTorch differ by {worst:.3g}, over the tolerance {args.tolerance:g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
