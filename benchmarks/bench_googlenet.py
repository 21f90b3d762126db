"""GoogLeNet speed: each variant beside torchvision's googlenet, same threads, input and batch.

    python benchmarks/bench_googlenet.py [--batch 16] [--size 224] [--repeats 5]

Inference runs channels_last for everyone (the reference included: it is 2.4x faster on CPU than
contiguous); ours additionally folds BatchNorm and merges the inception 1x1 convolutions
(backbone.inference.fuse_for_inference). Training times one SGD step (forward with aux heads,
backward, update) in channels_last. Timings are interleaved, reference and ours alternating, and the
median is reported, so load from other processes hits both sides alike. Achieved GFLOP/s use the
model's multiply-adds (2 FLOPs each) against float32 matmul and convolution peaks measured in the
same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from backbone import VARIANTS, googlenet
from backbone.inference import fuse_for_inference
from backbone.summary import compute_table1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side (median reported)")
    parser.add_argument("--iters", type=int, default=3, help="batches per timed round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--skip-train", action="store_true")
    return parser


def _best_gflops(op: Callable[[], None], flops: float, rounds: int = 5, iters: int = 5) -> float:
    for _ in range(3):
        op()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            op()
        best = max(best, flops * iters / (time.perf_counter() - start) / 1e9)
    return best


def compute_peak_gflops() -> tuple[float, float]:
    """Float32 ceilings measured now: MKL matmul (2048^2) and a large oneDNN 3x3 convolution in
    channels_last (an implicit GEMM; on AVX-512 CPUs oneDNN outruns MKL's sgemm by ~2x)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = _best_gflops(lambda: torch.mm(a, b), 2 * n**3)
    x = torch.randn(16, 256, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    conv = _best_gflops(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 16 * 256 * 256 * 9 * 28 * 28)
    return matmul, conv


def interleaved_rates(steps: dict[str, Callable[[], None]], images: int, repeats: int) -> dict[str, float]:
    """Images/s of each step function: one warm-up, then ``repeats`` alternating rounds, median."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: images / statistics.median(t) for name, t in times.items()}


def inference_step(model: torch.nn.Module, x: torch.Tensor, iters: int) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            for _ in range(iters):
                model(x)

    return step


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        for _ in range(iters):
            out = model(x)
            # torchvision returns (logits, aux2, aux1) in training, ours (logits, aux1, aux2).
            loss = loss_fn(out[0], y) + 0.3 * (loss_fn(out[1], y) + loss_fn(out[2], y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=cl)
    y = torch.randint(0, 1000, (args.batch,))
    n_images = args.batch * args.iters
    matmul_peak, conv_peak = compute_peak_gflops()
    peak = max(matmul_peak, conv_peak)
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {args.threads} threads, "
        f"batch {args.batch}, {args.size} px"
    )
    print(f"float32 peak measured now: matmul {matmul_peak:.0f} GFLOP/s, 3x3 convolution {conv_peak:.0f} "
          f"GFLOP/s; '% of peak' below is against the larger")  # fmt: skip

    reference = (
        torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
        .eval()
        .to(memory_format=cl)
    )
    models = {"torchvision (reference)": reference}
    macs = {}
    for variant in args.variants:
        model = googlenet(variant, aux_logits=True).eval()
        macs[variant] = sum(r.macs for r in compute_table1(model, args.size))
        models[variant] = fuse_for_inference(model)
    macs["torchvision (reference)"] = macs.get("torchvision") or sum(
        r.macs for r in compute_table1(googlenet("torchvision", aux_logits=False), args.size)
    )

    print("\ninference (images/s, eval, channels_last; ours fused)")
    rates = interleaved_rates(
        {k: inference_step(m, x, args.iters) for k, m in models.items()}, n_images, args.repeats
    )
    _report(rates, macs, peak)

    if args.skip_train:
        return
    print("\ntraining step (images/s, forward with aux heads + backward + SGD, channels_last)")
    train_models = {
        "torchvision (reference)": torchvision.models.googlenet(
            weights=None, aux_logits=True, init_weights=True
        )
    }
    for variant in args.variants:
        train_models[variant] = googlenet(variant, aux_logits=True)
    steps = {k: train_step(m.train().to(memory_format=cl), x, y, 1) for k, m in train_models.items()}
    rates = interleaved_rates(steps, args.batch, args.repeats)
    _report(rates, {k: 3 * v for k, v in macs.items()}, peak)  # backward ~ 2x forward


def _report(rates: dict[str, float], macs: dict[str, int], peak: float) -> None:
    ref = rates["torchvision (reference)"]
    print(f"{'model':<26}{'images/s':>10}{'vs reference':>14}{'GFLOP/s':>10}{'% of peak':>11}")
    for name, rate in rates.items():
        gflops = 2 * macs[name] * rate / 1e9
        print(f"{name:<26}{rate:>10.1f}{rate / ref:>13.2f}x{gflops:>10.1f}{100 * gflops / peak:>10.0f}%")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
