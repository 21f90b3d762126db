"""The main job end to end on built-in synthetic data (``make demo``): nothing to detections.

    python tools/demo.py [--out runs/demo] [--rebuild] [--quick]

Stages, each a tool run in its own process (as a user would run them) with its own run directory
under ``--out``: scenes (train / val) -> pretrain GoogLeNet-bn with aux heads (train_cls) ->
MultiBox (train_multibox) -> SS x2 + MultiBox proposals and the R-CNN region classifier
(train_det, which builds the proposal caches) -> evaluation. A stage whose model file was built
from the same command, config text, input models and scenes is reused and said so (``--rebuild`` starts
over). ``--quick`` shrinks every stage (the test suite's form). Writes ``--out``/detections/*.png
(ground truth beside detections, the first 8 validation scenes), the detector's pr_val/*.png,
eval_val.json and each stage's curves.png, and timings.json (seconds per stage; a reused stage
gives the seconds it took when built, and is listed under "reused").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write_text
from backbone.runtime.log import run_tool, setup_logging
from detect.datasets.synthetic import annotation_path, build_synthetic_detection_dataset, image_root
from detect.visualize import save_detection_pictures

logger = logging.getLogger("demo")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "demo"

# --quick: the same pipeline at toy sizes (about two minutes on 2 cores).
QUICK = {
    "pretrain": ["data.synthetic_train_size=512", "data.synthetic_val_size=128", "train.epochs=2"],
    # batch 4: the 16 quick scenes leave 14 training images after the 10% validation hold-out,
    # fewer than the config's batch of 16 (train_multibox stops: "no full batch").
    "multibox": ["train.epochs=1", "train.batch_size=4", "model.num_priors=20", "train.recall_top_k=[10,20]"],
    "detector": [
        "data.synthetic_train_images=16",
        "data.synthetic_val_images=8",
        "train.epochs=2",
        "train.eval_every=2",
        "proposals.multibox.top_k=20",
        "proposals.ss.max_proposals=100",
    ],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rebuild", action="store_true", help="delete --out and run every stage again")
    parser.add_argument("--quick", action="store_true", help="toy sizes (the test suite's reduced form)")
    return parser


def scene_settings(overrides: list[str]) -> dict[str, int]:
    """The scene counts and size of the detector config (with ``--quick``'s overrides): train_det
    reuses the scenes written here only when they match."""
    data = yaml.safe_load((CONFIGS / "detector.yaml").read_text())["data"]
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("data."):
            data[key[5:]] = yaml.safe_load(value)
    return {
        "train": data["synthetic_train_images"],
        "val": data["synthetic_val_images"],
        "image_size": data["synthetic_image_size"],
    }


def stage_key(command: list[str], config: Path, inputs: list[Path]) -> dict:
    """What a stage's model depends on: its command, its config file's text and the files it starts
    from and learns from (models and scene annotations; modification time and size): rewritten
    scenes retrain MultiBox and the detector."""
    return {
        "command": command[1:],
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "inputs": {str(p): [p.stat().st_mtime_ns, p.stat().st_size] for p in inputs},
    }


def run_stage(
    name: str,
    tool: str,
    config: Path,
    out: Path,
    overrides: list[str],
    inputs: list[Path],
    stale: Path | None = None,
) -> tuple[float, bool]:
    """Run ``tools/<tool>.py`` unless ``out`` holds a model.pt built from the same command, config
    text and input files (``inputs``); returns (seconds the build took, reused). ``stale``: a
    directory deleted before a build. ``out/demo_stage.json`` records that key and the seconds."""
    command = [sys.executable, str(REPO / "tools" / f"{tool}.py"), "--config", str(config), "--out", str(out)]
    command += ["--overwrite"] + [arg for item in overrides for arg in ("--set", item)]
    key = stage_key(command, config, inputs)
    record = out / "demo_stage.json"
    if (out / "model.pt").is_file() and record.is_file():
        built = json.loads(record.read_text())
        if built.get("key") == key:
            logger.info("%s: reusing %s (--rebuild to train again)", name, out / "model.pt")
            return float(built["seconds"]), True
        logger.info(
            "%s: %s was built from other settings or inputs: building it again", name, out / "model.pt"
        )
    record.unlink(missing_ok=True)
    if stale is not None and stale.exists():
        logger.info("%s: deleting %s, built for the previous model", name, stale)
        shutil.rmtree(stale)
    logger.info("%s: %s", name, " ".join(command[1:]))
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, check=False).returncode
    if code != 0:
        raise UserError(f"{name}: {tool} exited with code {code} (see {out / 'log.txt'})")
    seconds = time.perf_counter() - started
    atomic_write_text(record, json.dumps({"key": key, "seconds": seconds}, indent=2) + "\n")
    return seconds, False


def main(args: argparse.Namespace) -> int:
    setup_logging()
    out = args.out.resolve()
    if args.rebuild and out.exists():
        shutil.rmtree(out)
    quick = QUICK if args.quick else {}
    detector_overrides = [
        f"data.synthetic_root={out / 'scenes'}",
        f"proposals.cache_dir={out / 'proposals'}",
        *quick.get("detector", []),
    ]
    scenes = scene_settings(quick.get("detector", []))
    timings: dict[str, float] = {}
    reused: list[str] = []
    started = time.perf_counter()
    for split in ("train", "val"):
        build_synthetic_detection_dataset(
            out / "scenes", split, num_images=scenes[split], image_size=scenes["image_size"], seed=0
        )
    timings["scenes"] = time.perf_counter() - started

    pretrain, multibox, detector = out / "pretrain", out / "multibox", out / "detector"
    scenes_dir = out / "scenes"
    train_spec = (
        f"[{{path: {annotation_path(scenes_dir, 'train')}, image_root: {image_root(scenes_dir, 'train')}}}]"
    )
    scene_files = [annotation_path(scenes_dir, split) for split in ("train", "val")]
    # train_det refuses a proposal cache of other images or settings (other runs may read it); the
    # demo's caches are its own and cheap, so a detector built again starts without them.
    # name, tool, config, run directory, overrides, the files it learns from, deleted before a build
    stages = [
        ("pretrain", "train_cls", "pretrain.yaml", pretrain, quick.get("pretrain", []), [], None),
        ("multibox", "train_multibox", "multibox.yaml", multibox,
         [f"model.init={pretrain / 'model.pt'}", f"data.train={train_spec}", *quick.get("multibox", [])],
         [pretrain / "model.pt", scene_files[0]], None),
        ("detector", "train_det", "detector.yaml", detector,
         [f"model.init={pretrain / 'model.pt'}", f"proposals.multibox.model={multibox / 'model.pt'}",
          *detector_overrides], [pretrain / "model.pt", multibox / "model.pt", *scene_files],
         out / "proposals"),
    ]  # fmt: skip
    for name, tool, config, stage_dir, overrides, inputs, stale in stages:
        seconds, was_reused = run_stage(name, tool, CONFIGS / config, stage_dir, overrides, inputs, stale)
        timings[name] = seconds
        if was_reused:
            reused.append(name)

    dataset = build_synthetic_detection_dataset(
        out / "scenes", "val", num_images=scenes["val"], image_size=scenes["image_size"], seed=0
    )
    results = json.loads((detector / "detections_val.json").read_text())
    predictions: dict[int, dict] = {}
    id_to_label = {c: i for i, c in enumerate(dataset.category_ids)}
    for det in results:
        entry = predictions.setdefault(det["image_id"], {"boxes": [], "scores": [], "labels": []})
        x, y, w, h = det["bbox"]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(det["score"])
        entry["labels"].append(id_to_label[det["category_id"]])
    pictures = save_detection_pictures(dataset.records, predictions, dataset.class_names, out / "detections")
    timings["total"] = time.perf_counter() - started
    atomic_write_text(out / "timings.json", json.dumps(timings | {"reused": reused}, indent=2) + "\n")

    print((detector / "eval_val.txt").read_text())
    summary = json.loads((detector / "eval_val.json").read_text())
    voc = summary.get("voc", {}).get("mAP")
    coco = summary.get("coco", {}).get("stats", {}).get("AP")
    if voc is not None and coco is not None:
        print(f"mAP@0.5 (VOC all-point) {voc:.3f}, COCO AP {coco:.3f}")
    print(
        "timings (s): "
        + ", ".join(
            f"{k} {v:.0f}" + (" (reused: when built)" if k in reused else "") for k, v in timings.items()
        )
    )
    print(
        f"pictures: {len(pictures)} in {out / 'detections'}; PR curves: {detector / 'pr_val'}; "
        "training curves: */curves.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
