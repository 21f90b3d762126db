"""What a user would pick instead (issue 13): torchvision's FasterRCNN around our GoogLeNet, trained for
the same wall-clock budget on the same split as our R-CNN detector, scored by our evaluator.

    python benchmarks/bench_fasterrcnn.py --budget-minutes 40 --ours runs/fruit_crop
    python benchmarks/bench_fasterrcnn.py --budget-minutes 40 --train-ours configs/det/fruit_crop.yaml
    python benchmarks/bench_fasterrcnn.py --budget-minutes 0.3 --max-test-images 4     # smoke run

FasterRCNN: ``torchvision.models.detection.FasterRCNN`` with the GoogLeNet of ``--init`` (a train_cls
model.pt, the initial weights of configs/det/fruit_crop.yaml) cut after ``--stage`` (inception4e,
stride 16) as its one feature map; BatchNorm frozen (FrozenBatchNorm2d, as torchvision's detection
backbones), the stem frozen (``--freeze-through maxpool2``, as fruit_crop.yaml); anchors
``--anchor-sizes`` (fruit objects are 100-350 px at 384 px shorter side) x ratios 0.5/1/2;
RoIAlign 7x7 (MultiScaleRoIAlign on '0') and torchvision's default two-FC box head, both new. SGD
(momentum 0.9, weight decay 1e-4, ``--lr`` with a linear warm-up, then cosine over the wall-clock
budget), batches of 2 images, horizontal flips; no step starts once ``--budget-minutes`` of the
training loop are spent (decoding the training images beforehand is not counted, as for ours).
Images are decoded, shrunk (shorter side ``--shorter-side``, never enlarged) and normalised as our
detector's; FasterRCNN's own transform is replaced by one that only batches them (no second resize
or normalisation), so its boxes are in the shrunk image and are scaled back to original pixels.

Ours: ``--ours RUN_DIR`` (a finished tools/train_det.py run) or ``--train-ours CONFIG``, which runs
tools/train_det.py with ``train.epochs`` fitted to the budget from a probe run's step time (train_det
is bounded by whole epochs only: ``--max-steps`` stops it without writing model.pt). Its inference is
re-run here on the same test images. Its training minutes are the run's epoch times (metrics.jsonl);
its seconds per image are the region scoring measured here (decoding included, as for FasterRCNN)
plus the selective-search time its proposal cache recorded (one core per image; the cache makes the
scoring itself skip it).

Prints one table (method, training minutes, mAP@0.5 VOC all-point, COCO AP, seconds per test image)
and the ratios FasterRCNN / ours, and writes it as JSON to ``--out``. Run it alone: another CPU job
on the cores changes the timings and, through the budget, the accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from backbone.googlenet import GoogLeNet
from backbone.image_cache import shrink_to_shorter_side
from backbone.image_io import ImageDecodeError, read_image_rgb
from backbone.runtime.paths import resolve_data_path
from backbone.transforms import image_to_tensor
from backbone.weights import load_model
from detect.datasets.records import DetectionDataset, DetectionRecord
from detect.datasets.spec import DatasetSpec, open_dataset_specs
from detect.proposals.spec import ensure_proposals, spec_from_settings
from detect.rcnn.data import RegionScoringDataset
from detect.rcnn.engine import InferenceSettings, evaluate_predictions, inference_on_dataset
from detect.rcnn.predictor import load_detectors

REPO = Path(__file__).resolve().parents[1]
METRICS = ("voc", "coco")
# FasterRCNN keyword arguments that differ from torchvision's defaults.
FASTER_RCNN_SETTINGS = {
    "box_score_thresh": 0.01,  # as our test.score_threshold (torchvision: 0.05)
    "box_batch_size_per_image": 128,  # sampled RoIs per training image (torchvision: 512; CPU)
    "rpn_post_nms_top_n_train": 1000,  # (torchvision: 2000)
    "rpn_post_nms_top_n_test": 300,  # the Faster R-CNN paper's test proposals (torchvision: 1000)
}


class GoogLeNetTrunk(nn.Module):
    """``net`` up to ``stage`` as a FasterRCNN backbone: one feature map, ``out_channels`` from the
    model's ``feature_info``. The layers after ``stage``, the aux heads and the classifier are removed
    from ``net``; the rest runs through ``net.forward_features`` (``transform_input`` included)."""

    def __init__(self, net: GoogLeNet, stage: str = "inception4e", channels_last: bool = True) -> None:
        super().__init__()
        names = net.stage_names()
        for name in [*names[names.index(stage) + 1 :], "aux1", "aux2", "fc"]:
            setattr(net, name, None)
        self.net, self.stage, self.channels_last = net, stage, channels_last
        self.out_channels = next(info["channels"] for info in net.feature_info if info["name"] == stage)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net.forward_features(x, self.stage)


class PreparedImages(GeneralizedRCNNTransform):
    """FasterRCNN's input transform for images already shrunk and normalised as our detector's: only
    the batching (zero padding, the mean pixel, to a multiple of 32) is left, so detections come back
    in the coordinates of the images given."""

    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3)

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d (fixed statistics and affine, as in
    torchvision's detection backbones: two images per batch give poor statistics)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def build_fasterrcnn(
    net: GoogLeNet,
    num_classes: int,
    *,
    stage: str = "inception4e",
    anchor_sizes: Sequence[int] = (64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    freeze_through: str | None = "maxpool2",
    channels_last: bool = True,
    **settings,
) -> FasterRCNN:
    """FasterRCNN for ``num_classes`` object classes (its labels 1..C; 0 is background) around ``net``
    cut after ``stage``. ``settings`` override FasterRCNN's keyword arguments (after FASTER_RCNN_SETTINGS)."""
    net.freeze_through(freeze_through)
    trunk = GoogLeNetTrunk(freeze_batchnorm(net), stage, channels_last)
    model = FasterRCNN(
        trunk,
        num_classes=num_classes + 1,
        rpn_anchor_generator=AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        **(FASTER_RCNN_SETTINGS | settings),
    )
    model.transform = PreparedImages()
    return model.to(memory_format=torch.channels_last) if channels_last else model


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB, shrunk
    boxes: np.ndarray  # (N, 4) xyxy in its pixels
    labels: np.ndarray  # (N,) in 0..C-1


def shrunk_image(path: str, shorter_side: int) -> tuple[np.ndarray, float, float]:
    """The image at ``path`` decoded and shrunk, and its scale (sx, sy) from original pixels."""
    image = read_image_rgb(path)
    small = shrink_to_shorter_side(image, shorter_side)
    return small, small.shape[1] / image.shape[1], small.shape[0] / image.shape[0]


def load_samples(records: Sequence[DetectionRecord], shorter_side: int) -> list[Sample]:
    samples = []
    for record in records:
        try:
            image, sx, sy = shrunk_image(record.file_name, shorter_side)
        except ImageDecodeError as err:
            print(f"skipped: {err}")
            continue
        boxes = record.boxes * np.array([sx, sy, sx, sy], np.float32)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (
            boxes[:, 3] - boxes[:, 1] >= 1
        )  # FasterRCNN refuses others
        samples.append(Sample(image, boxes[keep], record.labels[keep]))
    return samples


def to_inputs(sample: Sample, flip: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """One image tensor and its FasterRCNN target (labels shifted to 1..C), mirrored when ``flip``."""
    image, boxes = sample.image, sample.boxes.reshape(-1, 4)
    if flip:
        width = image.shape[1]
        image = np.ascontiguousarray(image[:, ::-1])
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    target = {
        "boxes": torch.from_numpy(boxes.astype(np.float32).reshape(-1, 4)),
        "labels": torch.from_numpy(sample.labels.astype(np.int64) + 1),
    }
    return image_to_tensor(image), target


def train_step(model: FasterRCNN, optimizer: torch.optim.Optimizer, batch: Sequence[tuple]) -> float:
    images, targets = zip(*batch, strict=True)
    loss = sum(model(list(images), list(targets)).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_fasterrcnn(
    model: FasterRCNN,
    samples: Sequence[Sample],
    budget_s: float,
    *,
    lr: float,
    batch_size: int = 2,
    warmup_steps: int = 50,
    seed: int = 0,
    log_every: int = 20,
) -> dict[str, float]:
    """SGD with flips until ``budget_s`` seconds are spent; lr: a linear warm-up, then a cosine over
    the budget."""
    if len(samples) < batch_size:
        raise ValueError(f"{len(samples)} training images give no batch of {batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    model.train()
    step, losses, start = 0, [], time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s:
        order = rng.permutation(len(samples))
        for first in range(0, len(order) - batch_size + 1, batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                break
            factor = 0.5 * (1 + math.cos(math.pi * elapsed / budget_s)) * min(1.0, (step + 1) / warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            batch = [
                to_inputs(samples[i], bool(rng.random() < 0.5)) for i in order[first : first + batch_size]
            ]
            losses.append(train_step(model, optimizer, batch))
            step += 1
            if step % log_every == 0:
                print(
                    f"step {step} ({step * batch_size / len(samples):.1f} epochs): loss "
                    f"{np.mean(losses[-log_every:]):.3f}, lr {lr * factor:.5f}, {elapsed / 60:.1f} min"
                )
    epochs = step * batch_size / len(samples)
    return {"steps": step, "epochs": epochs, "seconds": elapsed, "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def detect_fasterrcnn(
    model: FasterRCNN, records: Sequence[DetectionRecord], shorter_side: int
) -> tuple[list[dict], float]:
    """Predictions ``{image_id, boxes (original pixels), scores, labels 0..C-1}`` and seconds per image
    (decoding and shrinking included, as in our detector's scoring)."""
    model.eval()
    predictions, seconds = [], 0.0
    for record in records:
        start = time.perf_counter()
        try:
            image, sx, sy = shrunk_image(record.file_name, shorter_side)
        except ImageDecodeError as err:
            print(f"skipped: {err} (its objects count as missed)")
            continue
        out = model([image_to_tensor(image)])[0]
        scale = torch.tensor([sx, sy, sx, sy])
        predictions.append(
            {"image_id": record.image_id, "boxes": out["boxes"] / scale, "scores": out["scores"]}
            | {"labels": out["labels"] - 1}
        )
        seconds += time.perf_counter() - start
    return predictions, seconds / max(len(predictions), 1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def probe_step_seconds(probe: Path) -> tuple[float, int]:
    """Seconds per step (the first, warm-up, left out) and steps per epoch of a train_det probe run
    logged every step. The trainer logs the throughput since the epoch's start, counting train_det's
    regions (``sampler.regions_per_batch`` a step), from which the elapsed time at each step follows."""
    regions = yaml.safe_load((probe / "config.yaml").read_text())["sampler"]["regions_per_batch"]
    rows = [r for r in read_jsonl(probe / "metrics.jsonl") if r.get("kind") == "train" and r["epoch"] == 0]
    if len(rows) < 2:
        raise SystemExit(f"{probe}: fewer than 2 logged steps in the first epoch; cannot time a step")
    first, last = rows[0], rows[-1]
    elapsed = [r["step"] * regions / r["images_per_s"] for r in (first, last)]
    return (elapsed[1] - elapsed[0]) / (last["step"] - first["step"]), round(
        first["step"] / first["epoch_float"]
    )


def run_tool(*command: str) -> None:
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise SystemExit(f"exit code {code} from: {' '.join(command)}")


def train_ours(
    config: Path,
    budget_s: float,
    work_dir: Path,
    threads: int,
    overrides: Sequence[str],
    probe_steps: int = 8,
) -> Path:
    """tools/train_det.py with ``train.epochs`` fitted to the budget (at least 1) from a probe run."""
    tool = [sys.executable, str(REPO / "tools" / "train_det.py"), "--config", str(config), "--overwrite"]
    sets = [arg for value in (f"threads={threads}", *overrides) for arg in ("--set", value)]
    probe = work_dir / "ours_probe"
    probe_cmd = [*tool, "--out", str(probe), "--max-steps", str(probe_steps), "--set", "train.log_interval=1"]
    run_tool(*probe_cmd, *sets)
    step_s, steps_per_epoch = probe_step_seconds(probe)
    epochs = max(1, int(budget_s // (step_s * steps_per_epoch)))
    print(
        f"ours: probe {step_s:.2f} s/step x {steps_per_epoch} steps/epoch -> train.epochs={epochs} "
        f"(~{epochs * steps_per_epoch * step_s / 60:.1f} min of a {budget_s / 60:.1f} min budget)"
    )
    run = work_dir / "ours"
    run_tool(*tool, "--out", str(run), *sets, "--set", f"train.epochs={epochs}")
    return run


def evaluate_ours(
    run_dir: Path, test_spec: DatasetSpec, test: DetectionDataset, max_images: int | None
) -> dict:
    """Our detector (run_dir/model.pt, BatchNorm folded as in test_det) on the first ``max_images``
    test images."""
    models, meta = load_detectors([run_dir / "model.pt"])
    config, data = meta["config"], meta["config"]["data"]
    if meta["class_names"] != test.class_names:
        raise SystemExit(
            f"{run_dir}: classes {meta['class_names']} differ from the test split's {test.class_names}"
        )
    # The run's own proposal cache when the test split is its validation split (as test_det).
    val_specs = [DatasetSpec(**spec) for spec in data["val"]]
    name, split = (data["name"], "val") if val_specs == [test_spec] else (Path(test_spec.path).stem, "test")
    records = test.records[:max_images]
    if len(records) < len(test.records):
        name += f"_first{len(records)}"  # a cache belongs to one record list
    spec = spec_from_settings(config["proposals"], source=f"{run_dir} proposals")
    proposals, _ = ensure_proposals(records, spec, name, split)
    t = config["test"]
    settings = InferenceSettings(
        t["region_batch"],
        t["score_threshold"],
        t["nms_iou"],
        t["max_per_image"],
        precision=t.get("precision", "fp32"),
    )
    scoring = RegionScoringDataset(records, proposals.boxes, data["shorter_side"])
    start = time.perf_counter()
    predictions = inference_on_dataset(models, scoring, settings, progress=False)[0]["final"]
    scoring_s = (time.perf_counter() - start) / max(len(predictions), 1)
    proposal_s = float(np.mean(proposals.seconds)) if len(proposals.seconds) else 0.0
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    details = {"run": str(run_dir), "epochs": len(epochs), "scoring_s_per_image": scoring_s}
    details |= {"proposal_s_per_image": proposal_s, "proposal_method": config["proposals"]["method"]}
    if (run_dir / "eval_val.json").is_file():  # the run's own figures on its whole validation split
        own = json.loads((run_dir / "eval_val.json").read_text())
        details["run_eval_val"] = {"mAP50_voc": own["voc"]["mAP"] if "voc" in own else None}
        details["run_eval_val"]["coco_AP"] = own["coco"]["stats"].get("AP") if "coco" in own else None
        print(f"ours: {run_dir}/eval_val.json (its validation split): {details['run_eval_val']}")
    return row(
        f"ours R-CNN ({meta['config']['model']['mode']} mode)",
        sum(r.get("epoch_seconds", 0.0) for r in epochs) / 60,
        evaluate_predictions(test, predictions, METRICS),
        scoring_s + proposal_s,
        details,
    )


HEADER = f"{'method':<42} {'train min':>9} {'mAP@0.5 (VOC)':>13} {'COCO AP':>8} {'s / test img':>12}"


def print_row(r: dict, header: bool = True) -> None:
    if header:
        print(HEADER)
    print(
        f"{r['method']:<42} {r['train_minutes']:>9.1f} {r['mAP50_voc']:>13.3f} {r['coco_AP']:>8.3f} "
        f"{r['seconds_per_image']:>12.3f}",
        flush=True,
    )


def row(method: str, minutes: float, results: dict, seconds: float, details: dict) -> dict:
    coco = results["coco"].stats.get("AP", float("nan"))
    return {
        "method": method,
        "train_minutes": minutes,
        "mAP50_voc": results["voc"].mean_ap,
        "coco_AP": coco,
        "seconds_per_image": seconds,
    } | {"details": details}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-minutes", type=float, default=40.0, help="wall-clock training budget")
    ours = parser.add_mutually_exclusive_group()
    ours.add_argument("--ours", type=Path, help="a finished tools/train_det.py run directory")
    ours.add_argument("--train-ours", type=Path, metavar="CONFIG", help="train ours on the same budget")
    parser.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE", help="--set for --train-ours"
    )
    parser.add_argument("--train", default="$SHARED_DATA/fruit/train")
    parser.add_argument("--test", default="$SHARED_DATA/fruit/test")
    parser.add_argument(
        "--init", default="$SHARED_DATA/../models/flowers_bn_128.pt", help="train_cls model.pt"
    )
    parser.add_argument("--stage", default="inception4e")
    parser.add_argument("--freeze-through", default="maxpool2", help="'none': train the whole trunk")
    parser.add_argument("--anchor-sizes", default="64,128,256,512", help="pixels at --shorter-side")
    parser.add_argument("--shorter-side", type=int, default=384)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--max-test-images", type=int, default=None, help="the first N test images only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fasterrcnn/results.json"))
    return parser


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget_s = args.budget_minutes * 60
    train, _ = open_dataset_specs((DatasetSpec(args.train),), name="train")
    test_spec = DatasetSpec(args.test)
    test, _ = open_dataset_specs((test_spec,), name="test")
    if test.class_names != train.class_names:
        raise SystemExit(f"--test: classes {test.class_names} differ from --train's {train.class_names}")
    test_records = test.records[: args.max_test_images]

    # Ours first: a finished run is scored in minutes, so a mismatch (classes, a stale proposal
    # cache) stops the benchmark before FasterRCNN's budget is spent, not after.
    rows = []
    ours_dir = args.ours
    if args.train_ours is not None:
        ours_dir = train_ours(args.train_ours, budget_s, args.out.parent, args.threads, args.ours_set)
    if ours_dir is not None:
        rows.append(evaluate_ours(ours_dir, test_spec, test, args.max_test_images))
        print_row(rows[-1])

    net, _ = load_model(resolve_data_path(args.init), aux_logits=False)
    model = build_fasterrcnn(
        net,
        len(train.class_names),
        stage=args.stage,
        anchor_sizes=[int(s) for s in args.anchor_sizes.split(",")],
        freeze_through=None if args.freeze_through == "none" else args.freeze_through,
        channels_last=not args.no_channels_last,
    )
    samples = load_samples(train.records, args.shorter_side)
    print(
        f"FasterRCNN: {len(samples)} training images, {args.budget_minutes:g} min budget, "
        f"{args.threads} threads"
    )
    trained = train_fasterrcnn(model, samples, budget_s, lr=args.lr, seed=args.seed)
    print(
        f"FasterRCNN: {trained['steps']} steps ({trained['epochs']:.1f} epochs) in "
        f"{trained['seconds'] / 60:.1f} min, final loss {trained['final_loss']:.3f}"
    )
    predictions, seconds = detect_fasterrcnn(model, test_records, args.shorter_side)
    rows.insert(
        0,
        row(
            f"FasterRCNN + our GoogLeNet ({args.stage})",
            trained["seconds"] / 60,
            evaluate_predictions(test, predictions, METRICS),
            seconds,
            trained,
        ),
    )
    print_row(rows[0])

    print(
        f"\n{len(predictions)} test images of {args.test}; torch {torch.__version__}, {args.threads} threads"
    )
    print(HEADER)
    for r in rows:
        print_row(r, header=False)
    if len(rows) == 2:
        faster, ours_row = rows
        print(
            f"FasterRCNN / ours: mAP@0.5 x{faster['mAP50_voc'] / max(ours_row['mAP50_voc'], 1e-9):.2f}, "
            f"COCO AP x{faster['coco_AP'] / max(ours_row['coco_AP'], 1e-9):.2f}, seconds per image "
            f"x{faster['seconds_per_image'] / ours_row['seconds_per_image']:.3f} "
            f"(ours: {ours_row['details']['scoring_s_per_image']:.2f} s scoring + "
            f"{ours_row['details']['proposal_s_per_image']:.2f} s proposals)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"test": args.test, "images": len(predictions), "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
