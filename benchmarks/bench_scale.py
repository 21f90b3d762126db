"""Scale, simulated on this machine: ILSVRC-sized proposal caches, a COCO-train-sized annotation file,
and the evaluator over COCO-val-sized detections; time and memory of each step, as one table.

    python benchmarks/bench_scale.py                     # the full sizes below (a few minutes, ~4 GB of disk)
    python benchmarks/bench_scale.py --images 10000 --coco-images 12000 --eval-images 500   # a quick look

(a) Proposal cache: ``--images`` x ``--boxes`` proposals written with the cache's own ``write_shard``
    in shards of ``--shard-size`` images (the default config's 16) plus a real manifest, then opened
    as train_det opens it (``split_proposals``: dataset fingerprint, every shard validated) and
    ``--reads`` random images read (their boxes checked). The page cache holds the just-written
    files, so reads are of memory, not disk.
(b) A COCO instances file of ``--coco-images`` images and ``--coco-boxes`` boxes in 80 categories
    (COCO train2017's counts), no image files: read by ``open_detection_dataset(require_images=False)``.
(c) ``DetectionEvaluator`` (coco, voc) over ``--eval-images`` images of 80 classes, ~7 objects and
    ``--dets-per-image`` detections each.

Each step runs in its own process (opening and reading the cache in one). "peak RSS" is that
process's maximum resident size; "step adds" is that peak minus its resident size just before the
step (imports, records and generated inputs done).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COCO_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # COCO's 80 ids in 1..90


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--boxes", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--coco-images", type=int, default=118_287)
    parser.add_argument("--coco-boxes", type=int, default=860_001)
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--tmp", default=None, help="where the temporary files go (default: the system's)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # run one step (child process)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    return parser


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process image's peak (VmHWM): ru_maxrss would keep the spawning parent's across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


class Step:
    """Wall and CPU seconds (all threads) and memory of one step of this process, from creation."""

    def __init__(self) -> None:
        self.before, self.cpu, self.start = resident_mb(), time.process_time(), time.perf_counter()

    def done(self, **extra) -> dict:
        seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
        return {"seconds": seconds, "cpu": cpu, "before": self.before, "peak": peak_mb(), **extra}


# ---- (a) proposal cache ---------------------------------------------------------------------------


def proposal_setup(args: argparse.Namespace, root: Path):
    from detect.datasets.records import DetectionRecord
    from detect.proposals.spec import ProposalSpec, configured_method

    image = root / "image.jpg"  # every record names it: the fingerprint stats it, nothing decodes it
    gt = np.array([[10, 10, 60, 50]], np.float32)
    records = [DetectionRecord(i + 1, str(image), 640, 480, gt, np.array([0])) for i in range(args.images)]
    spec = ProposalSpec(cache_dir=str(root / "cache"), shard_size=args.shard_size)
    return image, records, spec, configured_method(spec, "scale", "train")


def image_boxes(index: int, base: np.ndarray) -> np.ndarray:
    return base + np.float32(index % 101)  # integers: exact in float32, so reads can be checked


def base_boxes(count: int) -> np.ndarray:
    corner = np.arange(count, dtype=np.float32)[:, None] % 500
    return np.concatenate([corner, corner, corner + 30, corner + 20], axis=1)


def step_write_cache(args: argparse.Namespace, root: Path) -> dict:
    from detect.proposals.cache import cache_fingerprint
    from detect.proposals.shards import shard_path, write_shard

    image, records, _, (directory, method) = proposal_setup(args, root)
    image.write_bytes(b"never decoded")
    base, scores = base_boxes(args.boxes), np.linspace(1, 0, args.boxes, dtype=np.float32)
    step = Step()
    fingerprint, parts = cache_fingerprint(records, method)
    for shard, first in enumerate(range(0, args.images, args.shard_size)):
        indices = range(first, min(first + args.shard_size, args.images))
        ids = np.arange(indices.start, indices.stop, dtype=np.int64) + 1
        write_shard(
            shard_path(directory, shard),
            fingerprint,
            ids,
            [(image_boxes(i, base), scores, 1.0) for i in indices],
        )
    manifest = {"fingerprint": fingerprint, "parts": parts, "shard_size": args.shard_size, "complete": True}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = step.done(shards=shard + 1)
    return result | {"bytes": sum(p.stat().st_size for p in directory.glob("shard_*.npz"))}


def step_read_cache(args: argparse.Namespace, root: Path) -> dict:
    from detect.datasets.records import DetectionDataset
    from detect.rcnn.pipeline import DetectionSplit, split_proposals

    _, records, spec, _ = proposal_setup(args, root)
    base = base_boxes(args.boxes)
    step = Step()
    split = DetectionSplit(DetectionDataset(records, ["object"], [1]), "train")
    boxes, _ = split_proposals(split, spec, "scale", progress=False)
    opened = step.done()
    start = time.perf_counter()
    for index in random.Random(0).sample(range(len(records)), args.reads):
        if not np.array_equal(boxes[index], image_boxes(index, base)):
            raise SystemExit(f"image {index}: boxes differ from those written")
    read = (time.perf_counter() - start) / args.reads
    return opened | {"read_seconds": read, "peak": peak_mb()}  # the peak of opening and reading


# ---- (b) COCO annotations ------------------------------------------------------------------------


def step_write_coco(args: argparse.Namespace, root: Path) -> dict:
    rng = np.random.default_rng(0)
    category_ids = [c for c in range(1, 91) if c not in COCO_MISSING_IDS]
    images = [
        {"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 640, "height": 480}
        for i in range(args.coco_images)
    ]
    owner = rng.integers(0, args.coco_images, args.coco_boxes) + 1
    wh = rng.uniform(2, 140, (args.coco_boxes, 2)).round(2)
    xy = (rng.random((args.coco_boxes, 2)) * ([640, 480] - wh)).round(2)  # inside the image
    categories = rng.choice(category_ids, args.coco_boxes)
    crowd = rng.random(args.coco_boxes) < 0.01
    annotations = [
        {
            "id": j + 1,
            "image_id": int(owner[j]),
            "category_id": int(categories[j]),
            "bbox": [*xy[j].tolist(), *wh[j].tolist()],
            "area": float(wh[j, 0] * wh[j, 1]),
            "iscrowd": int(crowd[j]),
        }
        for j in range(args.coco_boxes)
    ]
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in category_ids],
    }
    path = root / "instances_train.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return {"bytes": path.stat().st_size}


def step_read_coco(args: argparse.Namespace, root: Path) -> dict:
    from detect.datasets import open_detection_dataset

    step = Step()
    dataset, _ = open_detection_dataset(root / "instances_train.json", require_images=False)
    return step.done(images=len(dataset.records), boxes=sum(len(r.boxes) for r in dataset.records))


# ---- (c) evaluator -------------------------------------------------------------------------------


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    wh = rng.uniform(8, 140, (count, 2))
    xy = rng.random((count, 2)) * ([640, 480] - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def eval_scene(args: argparse.Namespace):
    """Ground truth (~7 objects per image, 80 classes) and detections: each object found 0-2 times
    with jitter, the rest of ``--dets-per-image`` false positives."""
    from detect.datasets.records import DetectionDataset, DetectionRecord

    rng = np.random.default_rng(0)
    classes = 80
    records, predictions = [], []
    for i in range(args.eval_images):
        count = int(rng.integers(1, 15))
        gt = random_boxes(rng, count)
        labels = rng.integers(0, classes, count)
        records.append(DetectionRecord(i + 1, f"{i + 1}.jpg", 640, 480, gt, labels, np.zeros(count, bool)))
        source = np.repeat(np.arange(count), rng.integers(0, 3, count))[: args.dets_per_image]
        found = gt[source] + rng.normal(0, 4, (len(source), 4))
        fp = args.dets_per_image - len(source)
        predictions.append(
            {
                "image_id": i + 1,
                "boxes": np.concatenate([found, random_boxes(rng, fp)]).clip(0, [640, 480, 640, 480]),
                "scores": np.concatenate([rng.uniform(0.3, 1, len(source)), rng.uniform(0, 0.7, fp)]),
                "labels": np.concatenate([labels[source], rng.integers(0, classes, fp)]),
            }
        )
    names = [f"class{c}" for c in range(classes)]
    return DetectionDataset(records, names, list(range(1, classes + 1)), "scene"), predictions


def step_evaluate(args: argparse.Namespace, metric: str) -> dict:
    from detect.evaluation import DetectionEvaluator

    dataset, predictions = eval_scene(args)
    step = Step()
    evaluator = DetectionEvaluator(dataset, metric)
    evaluator.process(predictions)
    return step.done(map=evaluator.evaluate().mean_ap)


# ---- the parent: one process per step, one table ---------------------------------------------------


def run_step(args: argparse.Namespace, step: str, directory: Path) -> dict:
    argv = [sys.executable, __file__, "--step", step, "--dir", str(directory)]
    for name in ("images", "boxes", "shard_size", "reads", "coco_images", "coco_boxes", "eval_images"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--dets-per-image", str(args.dets_per_image)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    )
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def row(what: str, size: str, result: dict | None, seconds: str = "") -> str:
    """One table line; ``result`` None: a step sharing the previous line's process (and memory)."""
    if result is None:
        return f"{what:34s} {size:48s} {seconds:>16s}"
    seconds = f"{result['seconds']:.1f} ({result['cpu']:.1f})"
    memory = f"{result['peak']:8.0f} {result['peak'] - result['before']:9.0f}"
    return f"{what:34s} {size:48s} {seconds:>16s} {memory}"


def main(args: argparse.Namespace) -> int:
    if args.step is not None:
        root = Path(args.dir)
        steps = {
            "write_cache": lambda: step_write_cache(args, root),
            "read_cache": lambda: step_read_cache(args, root),
            "write_coco": lambda: step_write_coco(args, root),
            "read_coco": lambda: step_read_coco(args, root),
            "eval_coco": lambda: step_evaluate(args, "coco"),
            "eval_voc": lambda: step_evaluate(args, "voc"),
        }
        print(json.dumps(steps[args.step]()))
        return 0
    header = f"{'step':34s} {'size':48s} {'wall s (CPU s)':>16s} {'peak RSS':>8s} {'step adds':>9s} (MB)"
    lines = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.tmp) as tmp:
        write = run_step(args, "write_cache", Path(tmp))
        read = run_step(args, "read_cache", Path(tmp))
    shape = f"{args.images:,} img x {args.boxes:,} boxes"
    lines.append(row("proposal cache: write", f"{shape}, {write['bytes'] / 1e9:.2f} GB", write))
    lines.append(row("proposal cache: open as train_det", f"{write['shards']:,} shards validated", read))
    size, seconds = f"{args.reads:,} random images, page cache warm", f"{1e3 * read['read_seconds']:.3f} ms"
    lines.append(row("proposal cache: read one image", size, None, seconds))
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.tmp) as tmp:
        written = run_step(args, "write_coco", Path(tmp))
        coco = run_step(args, "read_coco", Path(tmp))
    size = f"{coco['images']:,} img, {coco['boxes']:,} boxes, 80 cls, {written['bytes'] / 1e6:.0f} MB"
    lines.append(row("COCO annotations: open", size, coco))
    for metric in ("coco", "voc"):
        result = run_step(args, f"eval_{metric}", Path(tempfile.gettempdir()))
        size = f"{args.eval_images:,} img x 80 cls, {args.eval_images * args.dets_per_image:,} dets"
        lines.append(row(f"evaluator: {metric} (mAP {result['map']:.3f})", size, result))
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
