"""A tiny MultiBox training run through tools/train_multibox.py: loss falls, recall rises, resume works."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from backbone import googlenet
from backbone.runtime.errors import UserError
from backbone.runtime.log import read_metrics
from backbone.weights import save_model
from detect.datasets import DetectionDataset, DetectionRecord, write_coco_json
from detect.proposals.multibox import load_multibox

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("train_multibox_tool", REPO / "tools" / "train_multibox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


train_multibox = load_tool()


def square_scenes(root: Path, count: int) -> Path:
    """64 px noise with one bright 24 px square in one of four places: a box only the image tells."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(count):
        image = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        x, y = 4 + 32 * (i % 2), 4 + 32 * ((i // 2) % 2)
        image[y : y + 24, x : x + 24] = rng.integers(150, 256, 3)
        path = root / "images" / f"{i:03d}.png"
        cv2.imwrite(str(path), image)
        box = np.array([[x, y, x + 24, y + 24]], np.float32)
        records.append(
            DetectionRecord(i + 1, str(path), 64, 64, box, np.zeros(1, np.int64), np.zeros(1, bool))
        )
    json_path = root / "squares.json"
    write_coco_json(
        DetectionDataset(records, ["square"], [1], "squares"), json_path, image_root=root / "images"
    )
    return json_path


def write_config(tmp_path: Path, epochs: int) -> Path:
    torch.manual_seed(0)
    # Stands in for a train_cls export: same file format (backbone.weights.save_model).
    save_model(tmp_path / "cls.pt", googlenet("bn", num_classes=4), {"val": {"top1": 25.0}})
    config = {
        "threads": 1,  # one thread: no spinning OpenMP peers on a shared machine, and exact resume
        "model": {
            "init": str(tmp_path / "cls.pt"),
            "stage": "inception4e",  # 4 x 4 cells at 64 px: where the square is stays visible
            "num_priors": 4,
            "reduced_channels": 16,
            "grid": 4,
        },
        "data": {
            "train": [{"path": str(square_scenes(tmp_path / "data", 64))}],
            "val_fraction": 0.25,
            "image_size": 64,
            "cache_shorter_side": 64,
        },
        "optim": {"lr": 0.003, "backbone_lr_factor": 1.0},
        "train": {
            "epochs": epochs,
            "batch_size": 8,
            "alpha": 10.0,
            "match": "priors",
            "log_interval": 2,
            "recall_top_k": [1],
            "warmup_epochs": 0.0,
        },
    }
    path = tmp_path / "multibox.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args: str) -> int:
    return train_multibox.main(train_multibox.get_args_parser().parse_args(list(args)))


def test_tiny_run_loss_falls_and_recall_rises(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=8)
    out = tmp_path / "run"
    assert run("--config", str(config), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    train_losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert np.mean(train_losses[-3:]) < 0.5 * np.mean(train_losses[:3])
    assert summary["val_loss"] < summary["initial_val"]["loss"]
    assert summary["val_recall@1"] >= summary["initial_val"]["recall@1"] + 40.0
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "checkpoint.pt", "log.txt"):
        assert (out / name).is_file()
    model, arch, meta = load_multibox(out / "model.pt")
    assert arch.num_priors == 4 and arch.image_size == 64
    assert meta["trained_from"]["init"] == str(tmp_path / "cls.pt")


def test_stopped_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=2)
    assert run("--config", str(config), "--out", str(tmp_path / "full")) == 0
    assert run("--config", str(config), "--out", str(tmp_path / "part"), "--max-steps", "7") == 0
    with pytest.raises(UserError, match="pass --resume"):
        run("--config", str(config), "--out", str(tmp_path / "part"))
    assert run("--config", str(config), "--out", str(tmp_path / "part"), "--resume") == 0
    full, _, _ = load_multibox(tmp_path / "full" / "model.pt")
    part, _, _ = load_multibox(tmp_path / "part" / "model.pt")
    for (name, a), b in zip(full.state_dict().items(), part.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-4, atol=1e-5)
