"""train_det / test_det through the tools: a tiny synthetic run learns, stops and resumes exactly,
writes everything inference needs, and bad input ends in one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tool_loader import load_tool

from backbone.image_io import read_image_rgb
from backbone.runtime.errors import UserError
from backbone.runtime.log import run_tool
from detect.datasets.synthetic import annotation_path, build_synthetic_detection_dataset, image_root
from detect.proposals.cache import read_cache
from detect.rcnn.model import load_detector
from detect.rcnn.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
train_det = load_tool("train_det")
detect_images = load_tool("detect_images")
test_det = load_tool("test_det")


def write_config(tmp_path: Path, **train) -> Path:
    """8 synthetic scenes, validated on the same images: a from-scratch network can fit them in a
    minute (it cannot learn 8 shape classes that generalise in that time), which proves that the
    labels, warps, loss and inference fit together."""
    scenes = tmp_path / "scenes"
    config = {
        "seed": 0,
        "deterministic": True,
        "threads": 2,
        "model": {"variant": "bn", "input_size": 64, "padding": 4},
        "data": {
            "synthetic_root": str(scenes),
            "synthetic_train_images": 8,
            "synthetic_image_size": 128,
            "val": [{"path": str(annotation_path(scenes, "train")),
                     "image_root": str(image_root(scenes, "train"))}],
        },
        "proposals": {"method": "ss", "ss": {"preset": "fast", "max_proposals": 150},
                      "cache_dir": str(tmp_path / "cache")},
        "sampler": {"images_per_batch": 2, "regions_per_batch": 32, "fg_fraction": 0.5, "bg_iou_low": 0.0,
                    "color_jitter": [0, 0, 0, 0]},
        "optim": {"kind": "adamw", "lr": 0.001, "head_lr_mult": 1.0, "weight_decay": 0.0,
                  "warmup_epochs": 0.5},
        "train": {"epochs": 15, "log_interval": 4, "eval_every": 100, **train},
        "test": {"metrics": ["voc", "coco"], "region_batch": 64},
    }  # fmt: skip
    build_synthetic_detection_dataset(scenes, "train", num_images=8, image_size=128)
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(tool, *argv: str) -> int:
    return tool.main(tool.get_args_parser().parse_args(list(argv)))


def test_tiny_run_learns_and_test_det_reproduces_its_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    untrained = tmp_path / "untrained"
    no_training = ("--set", "optim.lr=0.0", "--set", "train.epochs=1")
    assert run(train_det, "--config", str(config), "--out", str(untrained), *no_training) == 0
    out = tmp_path / "run"
    assert run(train_det, "--config", str(config), "--out", str(out)) == 0
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "checkpoint.pt", "model.pt", "summary.json"):
        assert (out / name).is_file(), name
    chance = json.loads((untrained / "summary.json").read_text())["val_mAP_voc"]
    learned = json.loads((out / "summary.json").read_text())["val_mAP_voc"]
    assert learned > chance + 0.15, (chance, learned)
    model, meta = load_detector(out / "model.pt")
    assert meta["class_names"] and model.arch.input_size == 64 and model.arch.mode == "crop"
    assert meta["proposals"]["kind"] == "selective_search"
    # test_det on the same split (BatchNorm folded) reproduces the training run's final numbers.
    assert run(test_det, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "test")) == 0
    tested = json.loads((tmp_path / "test" / "eval_val.json").read_text())
    assert tested["voc"]["mAP"] == pytest.approx(learned, abs=0.02)
    results = json.loads((tmp_path / "test" / "detections_val.json").read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    # An ensemble of the trained and the untrained model: the softmax average, a different result.
    assert run(test_det, "--checkpoint", str(out / "model.pt"), "--checkpoint", str(untrained / "model.pt"),
               "--out", str(tmp_path / "ens")) == 0  # fmt: skip
    ensemble = json.loads((tmp_path / "ens" / "eval_val.json").read_text())
    assert ensemble["voc"]["mAP"] != tested["voc"]["mAP"]
    # Data of another class set (one class, not the model's eight): one line, exit 2, no traceback.
    one_class = tmp_path / "one_class.json"
    scene = Path(train_records(tmp_path)[0].file_name)
    one_class.write_text(json.dumps({
        "images": [{"id": 1, "file_name": str(scene), "width": 128, "height": 128}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }))  # fmt: skip
    args = test_det.get_args_parser().parse_args(
        ["--checkpoint", str(out / "model.pt"), "--data", str(one_class)]
    )
    assert run_tool(test_det.main, args) == 2

    # tools/detect_images.py: the proposer rebuilt from the model file gives the cached boxes; a folder
    # with an unreadable file is processed, the file skipped and the exit code says so.
    predictor = Predictor([out / "model.pt"])
    record = train_records(tmp_path)[0]
    cached = read_cache(train_records(tmp_path), Path(meta["proposals"]["directory"]))[0].boxes[0]
    np.testing.assert_array_equal(predictor.propose(read_image_rgb(record.file_name))[0], cached)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(record.file_name, images / "scene.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "sub").mkdir()
    shutil.copy(record.file_name, images / "sub" / "scene.jpg")  # the same stem twice: two pictures
    code = run(
        detect_images, str(images), "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "det")
    )
    assert code == 1
    found = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert found and {d["file_name"] for d in found} == {
        str(images / "scene.jpg"),
        str(images / "sub" / "scene.jpg"),
    }
    assert (tmp_path / "det" / "scene.png").is_file() and (tmp_path / "det" / "scene_1.png").is_file()
    if not torch.cuda.is_available():  # a device that is not there: one line, exit 2
        argv = [str(images), "--checkpoint", str(out / "model.pt"), "--device", "cuda"]
        assert run_tool(detect_images.main, detect_images.get_args_parser().parse_args(argv)) == 2


def train_records(tmp_path: Path):
    return build_synthetic_detection_dataset(
        tmp_path / "scenes", "train", num_images=8, image_size=128
    ).records


def test_stop_and_exact_resume(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=1)
    args = ("--config", str(config), "--set", "test.metrics=[voc]")
    assert run(train_det, *args, "--out", str(tmp_path / "full")) == 0
    assert run(train_det, *args, "--out", str(tmp_path / "part"), "--max-steps", "3") == 0
    with pytest.raises(UserError, match="pass --resume"):
        run(train_det, *args, "--out", str(tmp_path / "part"))
    assert run(train_det, *args, "--out", str(tmp_path / "part"), "--resume") == 0
    full, _ = load_detector(tmp_path / "full" / "model.pt")
    part, _ = load_detector(tmp_path / "part" / "model.pt")
    for (name, a), b in zip(full.state_dict().items(), part.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name, rtol=0, atol=1e-6)


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    parser = train_det.get_args_parser()
    # A stale proposal cache (other settings) is refused, naming the directory to delete.
    (tmp_path / "cache" / "synthetic" / "train" / "ss_fast").mkdir(parents=True)
    (tmp_path / "cache" / "synthetic" / "train" / "ss_fast" / "manifest.json").write_text(
        '{"fingerprint": "x"}'
    )
    code = run_tool(
        train_det.main, parser.parse_args(["--config", str(config), "--out", str(tmp_path / "a")])
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "stale proposal cache" in err[0] and "delete" in err[0]
    # A checkpoint that is not a detector.
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": {}}, bogus)
    code = run_tool(test_det.main, test_det.get_args_parser().parse_args(["--checkpoint", str(bogus)]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "not a detector model file" in err[0]


def test_extras_are_scored_with_and_without_in_one_final_pass(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=2)
    out = tmp_path / "run"
    extras = (
        "--set",
        "extras.box_regression=true",
        "--set",
        "extras.box_iou=0.5",
        "--set",
        "test.metrics=[voc]",
    )
    assert run(train_det, "--config", str(config), "--out", str(out), *extras) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"val_mAP_voc", "val_before_extras_mAP_voc"} <= set(summary)
    # The last epoch is not evaluated by the trainer: the one pass after fitting the extras scores both.
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("val_") for k in epochs[-1])
    model, _ = load_detector(out / "model.pt")
    assert model.box_regressor is not None
    # test_det's one pass writes the same two variants.
    assert run(test_det, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "t"),
               "--variants", "softmax") == 0  # fmt: skip
    final = json.loads((tmp_path / "t" / "eval_val.json").read_text())["voc"]["mAP"]
    plain = json.loads((tmp_path / "t" / "eval_val_softmax.json").read_text())["voc"]["mAP"]
    assert final == pytest.approx(summary["val_mAP_voc"], abs=0.02)
    assert plain == pytest.approx(summary["val_before_extras_mAP_voc"], abs=0.02)
    # --flip scores each region on the image and its mirror: other scores, same images and classes.
    assert run(test_det, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "f"), "--flip") == 0
    direct, flipped = (json.loads((tmp_path / d / "detections_val.json").read_text()) for d in ("t", "f"))
    assert {d["image_id"] for d in flipped} == {d["image_id"] for d in direct}
    assert sorted(d["score"] for d in flipped) != sorted(d["score"] for d in direct)
    # A variant that needs an extra the model does not carry is refused, not silently the softmax.
    argv = ["--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "t2"), "--variants", "svm"]
    with pytest.raises(UserError, match="carry no SVMs"):
        test_det.main(test_det.get_args_parser().parse_args(argv))


def torchrun(tool: str, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*launcher, f"tools/{tool}.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_two_process_torchrun_trains_and_splits_evaluation_across_ranks(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=1)
    out = tmp_path / "ddp"
    one_thread = ("--set", "threads=1")
    proc = torchrun("train_det", "--config", str(config), "--out", str(out), *one_thread)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_mAP_voc" in json.loads((out / "summary.json").read_text())
    # test_det over 2 ranks (each scores half of the images, rank 0 gathers) == one process.
    single, split = tmp_path / "single", tmp_path / "split"
    assert run(test_det, "--checkpoint", str(out / "model.pt"), "--out", str(single)) == 0
    proc = torchrun("test_det", "--checkpoint", str(out / "model.pt"), "--out", str(split))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((d / "eval_val.json").read_text()) for d in (single, split))
    assert two["voc"]["mAP"] == pytest.approx(one["voc"]["mAP"], abs=1e-6)
    dets = [json.loads((d / "detections_val.json").read_text()) for d in (single, split)]
    assert len(dets[1]) == len(dets[0]) and {d["image_id"] for d in dets[1]} == {
        d["image_id"] for d in dets[0]
    }
