"""Parallel proposal extraction vs one process: the same images, method and cache code, timed side by side.

    python benchmarks/bench_proposals.py [--images 24] [--workers 2] [--preset fast] [--data fruit/test]

Both runs go through ``detect.proposals.cache.build_cache`` into fresh temporary caches, so the
timing includes everything a real run does (decoding, selective search, shard writing, the pool's
start-up). Target: >= 1.8x with 2 workers on 2 cores. The boxes of both runs are checked to be
identical. Other processes on the machine slow the parallel run more than the serial one: run it
on an otherwise idle machine and look at the load average printed with the result.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backbone.runtime.paths import shared_data_root
from detect.datasets import open_detection_dataset
from detect.proposals.cache import build_cache, load_cache
from detect.proposals.methods import SelectiveSearchMethod
from detect.proposals.selective_search import ss_settings


def get_args_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", default="fruit/test", help="image+XML folder under $SHARED_DATA")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings per side")
    return parser


def timed_build(records, method, workers: int) -> tuple[float, list[np.ndarray], float]:
    """Wall seconds, the boxes, and the summed per-image seconds measured inside the workers."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_cache(records, method, Path(tmp) / "cache", workers=workers, shard_size=4, progress=False)
        seconds = time.perf_counter() - start
        loaded = load_cache(records, method, Path(tmp) / "cache")
        return seconds, list(loaded.boxes), float(loaded.seconds.sum())  # read before tmp goes


def main(args: argparse.Namespace) -> int:
    root = shared_data_root() / args.data
    if not root.is_dir():
        print(f"error: {root}: data set not found (set SHARED_DATA)", file=sys.stderr)
        return 2
    records = open_detection_dataset(root)[0].records[: args.images]
    method = SelectiveSearchMethod(ss_settings(args.preset))
    fastest = {}
    for workers in (1, args.workers):
        runs = [timed_build(records, method, workers) for _ in range(args.repeats)]
        fastest[workers] = min(runs, key=lambda run: run[0])
    (serial, serial_boxes, serial_work), (parallel, parallel_boxes, parallel_work) = (
        fastest[1],
        fastest[args.workers],
    )
    same = all(np.array_equal(a, b) for a, b in zip(serial_boxes, parallel_boxes, strict=True))
    n = len(records)
    print(f"selective search {args.preset} on {n} images of {args.data} ({os.cpu_count()} cores)")
    print(f"{'1 process':>22s}: {serial:7.2f} s  ({n / serial:5.2f} img/s)")
    print(f"{f'{args.workers} worker processes':>22s}: {parallel:7.2f} s  ({n / parallel:5.2f} img/s)")
    print(f"speed-up: {serial / parallel:.2f}x (target >= 1.8x); identical boxes: {same}")
    # If the machine is shared, each worker's own per-image time grows: that is lost CPU, not overhead.
    print(
        f"summed per-image work: {serial_work:.2f} s serial, {parallel_work:.2f} s in the workers "
        f"(x{parallel_work / serial_work:.2f}); workers busy on average: {parallel_work / parallel:.2f}"
    )
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
