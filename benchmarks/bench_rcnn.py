"""Region scoring speed: crop mode (warping included) against the bare network on ready crops, and
shared-feature mode against crop mode, in one run on the same image and boxes.

    python benchmarks/bench_rcnn.py [--size 128] [--regions 128] [--image 384x512] [--repeats 3]
        [--trunk-stage inception4e --trunk-stage inception5a] [--sampling-ratio 2 --sampling-ratio 1]

Prints the ratio crop-mode throughput / bare-forward throughput (issue target >= 0.85) and the
seconds per image of both modes' region stage for ``--proposals`` boxes (target: shared >= 10x fewer).
Run it alone: another CPU job on the cores changes both sides, not only one.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from backbone.inference import fuse_for_inference
from detect.rcnn.engine import region_probs
from detect.rcnn.model import RegionClassifier, RegionClassifierArch, build_region_classifier


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def crop_classifier(size: int, sampling_ratio: int) -> RegionClassifier:
    arch = RegionClassifierArch("bn", 3, input_size=size, padding=8, sampling_ratio=sampling_ratio)
    crop = build_region_classifier(arch).eval()
    crop.backbone = fuse_for_inference(crop.backbone, channels_last=True)
    return crop


@torch.no_grad()
def bare_and_warped_seconds(
    crop: RegionClassifier, image: torch.Tensor, rois: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """Seconds of the bare forward on ready crops and of warp + forward, on the same regions."""
    crops = crop.warp(image, rois).contiguous(memory_format=torch.channels_last)
    bare = best_of(lambda: crop.backbone(crops), repeats)
    warped = best_of(lambda: crop.backbone(crop.warp(image, rois)), repeats)
    return bare, warped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--regions", type=int, default=128, help="regions per forward (the batch)")
    parser.add_argument("--proposals", type=int, default=512, help="boxes per image for seconds per image")
    parser.add_argument("--image", default="384x512", help="HxW of the image the boxes come from")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--trunk-stage", action="append", default=None, help="shared mode's last per-image stage (repeatable)"
    )
    parser.add_argument(
        "--sampling-ratio", type=int, action="append", default=None,
        help="crop warp's roi_align samples per bin side (repeatable; the first meets shared mode)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.image.split("x"))
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, height, width, generator=gen).contiguous(memory_format=torch.channels_last)
    xy = torch.rand(args.proposals, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
    wh = 20 + torch.rand(args.proposals, 2, generator=gen) * torch.tensor([width * 0.3, height * 0.3])
    boxes = torch.cat([xy, xy + wh], dim=1)

    rois = torch.cat([torch.zeros(args.regions, 1), boxes[: args.regions]], dim=1)
    ratios = args.sampling_ratio or [2]
    crop_by_ratio = {ratio: crop_classifier(args.size, ratio) for ratio in ratios}
    for ratio, model in crop_by_ratio.items():
        bare, warped = bare_and_warped_seconds(model, image, rois, args.repeats)
        print(
            f"{args.regions} regions at {args.size} px, sampling ratio {ratio}: bare forward "
            f"{args.regions / bare:.1f} regions/s, warp + forward {args.regions / warped:.1f} regions/s, "
            f"ratio {bare / warped:.3f} (target >= 0.85)"
        )
    crop = crop_by_ratio[ratios[0]]

    crop_s = best_of(lambda: region_probs(crop, image, boxes, args.regions), 1)
    for stage in args.trunk_stage or ["inception4e"]:
        arch = RegionClassifierArch("bn", 3, mode="shared", input_size=args.size, padding=8)
        arch = dataclasses.replace(arch, trunk_stage=stage)
        shared = build_region_classifier(arch).eval()
        shared.backbone = fuse_for_inference(shared.backbone, channels_last=True)
        shared_s = best_of(lambda: region_probs(shared, image, boxes, args.regions), 1)  # noqa: B023
        print(
            f"{args.proposals} proposals on a {height}x{width} image: crop mode {crop_s:.2f} s/img, "
            f"shared mode (trunk to {stage}) {shared_s:.2f} s/img, "
            f"{crop_s / shared_s:.1f}x fewer seconds (target >= 10x)"
        )


if __name__ == "__main__":
    main()
