"""Vectorised voc07 / voc / ilsvrc scoring vs a straightforward per-class Python loop, same run.

    python benchmarks/bench_det_eval.py                      # 5,000 images x 200 classes x 100 dets/image
    python benchmarks/bench_det_eval.py --images 500         # a quick look

The scene is ILSVRC-like: 1-5 objects per image (some under 20 px, where the ILSVRC threshold drops
below 0.5; 30% overlapping a neighbour of their class, where the ILSVRC and VOC matching rules
differ), each detected 0-3 times with jitter (duplicates), and the rest of the 100 detections per
image are false positives, half of them in classes present in the image (so they must be matched
and rejected). Scores have ties. Prints time, speed-up, whether every per-class AP is identical,
the evaluation's peak traced memory (numpy allocations, tracemalloc) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
import tracemalloc

import numpy as np

from detect.evaluation import DetectionArrays, GroundTruthArrays, evaluate_pascal
from detect.evaluation.reference import reference_pascal_ap


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--metrics", default="voc07,voc,ilsvrc")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_scene(
    images: int, classes: int, dets_per_image: int, seed: int
) -> tuple[GroundTruthArrays, DetectionArrays]:
    rng = np.random.default_rng(seed)
    per_image = rng.integers(1, 6, images)
    gt_image = np.repeat(np.arange(images), per_image)
    count = len(gt_image)
    gt_labels = rng.integers(0, classes, count)
    side = np.where(
        rng.random((count, 2)) < 0.15, rng.uniform(4, 20, (count, 2)), rng.uniform(20, 300, (count, 2))
    )
    xy = rng.uniform(0, 200, (count, 2))
    # Crowds: 30% of objects overlap the previous object of their image, in the same class.
    crowd = np.flatnonzero((gt_image[1:] == gt_image[:-1]) & (rng.random(count - 1) < 0.3)) + 1
    gt_labels[crowd] = gt_labels[crowd - 1]
    side[crowd] = side[crowd - 1]
    xy[crowd] = xy[crowd - 1] + side[crowd - 1] * rng.uniform(0.1, 0.4, (len(crowd), 2))
    gt_boxes = np.round(np.concatenate([xy, xy + side], axis=1))
    gt_boxes[:, 2:] = np.maximum(gt_boxes[:, 2:], gt_boxes[:, :2] + 1)
    gt = GroundTruthArrays(
        image_ids=np.arange(images, dtype=np.int64),
        box_image_ids=gt_image.astype(np.int64),
        boxes=gt_boxes,
        labels=gt_labels.astype(np.int64),
        difficult=rng.random(count) < 0.03,
        class_names=[f"class{c}" for c in range(classes)],
    )
    copies = rng.integers(0, 4, count)  # detections per object: misses and duplicates
    source = np.repeat(np.arange(count), copies)
    noise = rng.normal(0, 1, (len(source), 4)) * (0.08 * np.tile(side[source], 2) + 1.5)  # small boxes suffer
    true_boxes = gt_boxes[source] + noise
    true_images, true_labels = gt_image[source], gt_labels[source]
    kept = np.minimum(np.bincount(true_images, minlength=images), dets_per_image)
    fill = dets_per_image - kept  # the rest: false positives
    fp_images = np.repeat(np.arange(images), fill)
    first_gt = np.concatenate(([0], np.cumsum(per_image)[:-1]))
    present = gt_labels[first_gt[fp_images] + rng.integers(0, per_image[fp_images])]
    fp_labels = np.where(rng.random(len(fp_images)) < 0.5, present, rng.integers(0, classes, len(fp_images)))
    fp_xy = rng.uniform(0, 400, (len(fp_images), 2))
    fp_boxes = np.concatenate([fp_xy, fp_xy + rng.uniform(5, 200, (len(fp_images), 2))], axis=1)
    # Cap true detections at dets_per_image per image (a few-object image never reaches it).
    order = np.argsort(true_images, kind="stable")
    starts = np.searchsorted(true_images[order], np.arange(images))
    position = np.arange(len(order)) - starts[true_images[order]]
    keep_true = np.zeros(len(source), bool)
    keep_true[order[position < dets_per_image]] = True
    boxes = np.concatenate([true_boxes[keep_true], fp_boxes])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    dets = DetectionArrays(
        image_ids=np.concatenate([true_images[keep_true], fp_images]).astype(np.int64),
        boxes=boxes,
        scores=np.round(
            np.concatenate([rng.uniform(0.3, 1.0, keep_true.sum()), rng.uniform(0, 0.8, len(fp_images))]), 3
        ),
        labels=np.concatenate([true_labels[keep_true], fp_labels]).astype(np.int64),
    )
    return gt, dets


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    gt, dets = make_scene(args.images, args.classes, args.dets_per_image, args.seed)
    print(
        f"scene: {args.images} images, {args.classes} classes, {len(gt.labels)} objects, "
        f"{len(dets)} detections (built in {time.perf_counter() - start:.1f} s, "
        f"peak RSS so far {peak_rss_mb():.0f} MB)"
    )
    rows = []
    for metric in args.metrics.split(","):
        tracemalloc.start()
        start = time.perf_counter()
        fast = evaluate_pascal(gt, dets, metric)
        fast_time = time.perf_counter() - start
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_after_fast = peak_rss_mb()
        start = time.perf_counter()
        slow = reference_pascal_ap(gt, dets, metric)
        slow_time = time.perf_counter() - start
        same = all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(fast.ap, slow, strict=True))
        diff = max((abs(x - y) for x, y in zip(fast.ap, slow, strict=True) if not math.isnan(x)), default=0.0)
        rows.append(
            (metric, fast_time, slow_time, same, diff, fast.mean_ap, traced_peak / 2**20, rss_after_fast)
        )
    header = (
        "metric",
        "vectorised",
        "loop",
        "speed-up",
        "APs identical",
        "max |dAP|",
        "mAP",
        "eval peak",
        "peak RSS",
    )
    widths = (-7, 11, 9, 9, 14, 10, 7, 10, 9)
    print(" ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for metric, fast_time, slow_time, same, diff, mean_ap, traced, rss in rows:
        print(
            f"{metric:<7} {fast_time:>10.2f}s {slow_time:>8.2f}s {slow_time / fast_time:>8.1f}x "
            f"{str(same):>14} {diff:>10.1e} {mean_ap:>7.4f} {traced:>8.0f}MB {rss:>7.0f}MB"
        )
    print(f"process peak RSS at the end (includes the loop reference): {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
