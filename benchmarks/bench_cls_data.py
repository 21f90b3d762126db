"""Is the classification data pipeline fast enough? Per-image cost of each input pipeline beside the
training step it feeds, in one run.

    python benchmarks/bench_cls_data.py [--size 128] [--batch 32] [--images 512] [--data PATH]

Times, on one core each (the data loader's worker and the training step compete for the same
cores), the milliseconds per image of:
  - flowers, decoded from disk on every access, + the paper's train augmentation;
  - flowers from the in-memory decoded-image cache (cache=True) + the same augmentation;
  - the synthetic shapes set (rendered per access) + augmentation;
  - evaluation (resize + centre crop) and the 10- and 144-crop cutting;
beside one SGD step (forward with aux heads, backward, update) of GoogLeNet-bn in channels_last at
the same size, per image. The printed ratio "step / pipeline" says how many images the model
consumes in the time the pipeline produces one: above ~10, the pipeline costs under 10% of a step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from backbone import googlenet
from backbone.data import build_classification_datasets
from backbone.runtime.paths import shared_data_root
from backbone.transforms import multi_crop


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128, help="training crop size")
    parser.add_argument("--batch", type=int, default=32, help="batch of the timed training step")
    parser.add_argument("--images", type=int, default=512, help="images per timed pipeline round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--data", default=None, help="flowers root (default: $SHARED_DATA/flowers)")
    return parser


def ms_per_item(run: Callable[[int], None], count: int, repeats: int) -> float:
    run(0)  # warm-up
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            run(i)
        rounds.append((time.perf_counter() - start) * 1000 / count)
    return statistics.median(rounds)


def train_step_ms_per_image(size: int, batch: int, repeats: int) -> float:
    model = googlenet("bn", num_classes=5, aux_logits=True).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (batch,))

    def step(_: int) -> None:
        out = model(images)
        loss = sum(torch.nn.functional.cross_entropy(o, labels) for o in (out.logits, out.aux1, out.aux2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return ms_per_item(step, 2, repeats) / batch


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one core for the pipeline...
    root = args.data or shared_data_root() / "flowers"
    disk, _, _ = build_classification_datasets(root, args.size)
    cached, val, _ = build_classification_datasets(root, args.size, cache=True)
    n = min(args.images, len(disk))
    synthetic, _, _ = build_classification_datasets(None, args.size, synthetic_train_size=n)
    raw = [val.load_image(i) for i in range(min(64, len(val)))]
    rows = {
        "flowers, decode + train augmentation": ms_per_item(lambda i: disk[i], n, args.repeats),
        "flowers, cached + train augmentation": ms_per_item(lambda i: cached[i], n, args.repeats),
        "synthetic, render + train augmentation": ms_per_item(lambda i: synthetic[i], n, args.repeats),
        "flowers, cached + eval resize/centre crop": ms_per_item(
            lambda i: val[i % len(val)], n, args.repeats
        ),
        "10 crops of one image (cut only)": ms_per_item(
            lambda i: multi_crop(raw[i % len(raw)], args.size, 10), len(raw), args.repeats
        ),
        "144 crops of one image (cut only)": ms_per_item(
            lambda i: multi_crop(raw[i % len(raw)], args.size, 144), len(raw), args.repeats
        ),
    }
    torch.set_num_threads(1)  # ...and one for the step it feeds
    step = train_step_ms_per_image(args.size, args.batch, args.repeats)
    print(f"GoogLeNet-bn train step at {args.size}px, batch {args.batch}, 1 thread: {step:.2f} ms/image")
    print(f"{'pipeline (1 thread)':45s} {'ms/image':>9s} {'images/s':>9s} {'step/pipeline':>14s}")
    for name, ms in rows.items():
        print(f"{name:45s} {ms:9.3f} {1000 / ms:9.0f} {step / ms:14.1f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
