"""Is train_cls limited by its data pipeline? Training images/s with the real loader beside the bare
step (same model, same batch size, one fixed batch reused, no loading), in the same run.

    python benchmarks/bench_train_cls.py [--config configs/cls/flowers_bn_128.yaml] [--set KEY=VALUE]
                                         [--steps 20] [--rounds 3]

Both sides run the identical training step of tools/train_cls.py (MixUp/CutMix when configured,
channels_last forward with aux heads, aux-weighted loss, backward, SGD update, LR schedule, EMA
update, in the config's ``train.precision``). Rounds alternate (bare, pipeline, bare, pipeline, ...)
so load from other processes hits both sides alike; the median round of each is reported. Target
(issue 3): pipeline throughput within 10% of the bare step, i.e. ratio >= 0.90. Each pipeline round
starts a fresh epoch iterator, as training does once per epoch; the first ``--warmup`` batches of
every round are not timed. With progressive resizing (``data.min_image_size``) both sides run at the
size of epoch 0; pass ``--set data.min_image_size=null`` to time the full size.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from backbone import googlenet
from backbone.ema import ModelEma
from backbone.engine import batch_mix, classification_step
from backbone.runtime import config as cfglib
from backbone.runtime.loader import ResumableLoader
from backbone.runtime.log import run_tool
from backbone.runtime.optim import build_lr_scheduler, build_optimizer, lr_factor_fn
from backbone.runtime.precision import MixedPrecision

REPO = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cls" / "flowers_bn_128.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (median reported)")
    return parser


def load_train_cls_module() -> Any:
    """tools/ is not a package: load train_cls.py to reuse its config schema and data set-up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cls_tool", REPO / "tools" / "train_cls.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed_round(
    batches: Iterator[Any], step_fn, precision, model, optimizer, scheduler, ema, steps: int, warmup: int
):
    """Images/s over ``steps`` training steps after ``warmup`` untimed ones."""
    model.train()
    images = 0
    start = 0.0
    for i, batch in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            start = time.perf_counter()
            images = 0
        with precision.autocast():
            out = step_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(out.loss, optimizer, model.parameters())
        scheduler.step()
        ema.update(model, i + 1)
        images += out.batch_size
    return images / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> int:
    train_cls = load_train_cls_module()
    cfg = cfglib.load_config(args.config, train_cls.TrainClsConfig, args.overrides)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_ds, _, class_names, _ = train_cls.build_data(cfg)
    loader = ResumableLoader(train_ds, cfg.train.batch_size, seed=cfg.seed, num_workers=cfg.data.workers)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = googlenet(cfg.model.variant, num_classes=len(class_names), aux_logits=cfg.model.aux_logits)
    model = model.to(memory_format=memory_format)
    ema = ModelEma(model, decay=cfg.ema.decay)
    optimizer = build_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = build_lr_scheduler(optimizer, lr_factor_fn("constant", 1, 1))
    mix = batch_mix(len(class_names), cfg.train.mixup_alpha, cfg.train.cutmix_alpha)
    step_fn = classification_step(
        torch.device("cpu"), cfg.train.aux_weight, channels_last=cfg.channels_last, mix=mix
    )
    precision = MixedPrecision(cfg.train.precision, torch.device("cpu"))
    fixed = next(iter(loader.epoch_batches(0)))
    timing = (precision, model, optimizer, scheduler, ema, args.steps, args.warmup)

    bare, piped = [], []
    for round_index in range(args.rounds):
        bare.append(timed_round(itertools.repeat(fixed), step_fn, *timing))
        batches = loader.epoch_batches(round_index)
        piped.append(timed_round(batches, step_fn, *timing))
        del batches  # persistent workers stay, idle once their few prefetched batches are queued
        print(f"round {round_index + 1}: bare {bare[-1]:.1f} img/s, with data pipeline {piped[-1]:.1f} img/s")
    bare_median, piped_median = statistics.median(bare), statistics.median(piped)
    ratio = piped_median / bare_median
    print(
        f"config {args.config} {' '.join(args.overrides)}: {cfg.model.variant} {fixed[0].shape[-1]} px, "
        f"batch {cfg.train.batch_size}, {cfg.data.workers} loader worker(s), cache={cfg.data.cache}, "
        f"threads={torch.get_num_threads()}, precision {cfg.train.precision}"
    )
    print(f"bare step:          {bare_median:7.1f} img/s")
    print(f"with data pipeline: {piped_median:7.1f} img/s")
    print(f"ratio pipeline/bare: {ratio:.3f} (target >= 0.90) -> {'OK' if ratio >= 0.9 else 'BELOW TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
