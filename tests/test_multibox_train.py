"""A tiny MultiBox training run through tools/train_multibox.py: loss falls, recall rises, resume works;
and detect.proposals.multibox_train's records and split."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from tool_loader import load_tool

from backbone import googlenet
from backbone.runtime.errors import UserError
from backbone.runtime.log import read_metrics
from backbone.weights import save_model
from detect.datasets import DetectionDataset, DetectionRecord, write_coco_json
from detect.datasets.spec import DatasetSpec
from detect.proposals.multibox import load_multibox
from detect.proposals.multibox_train import load_records, split_train_val

REPO = Path(__file__).resolve().parents[1]


train_multibox = load_tool("train_multibox")


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


def test_load_records_keeps_unique_ids_and_never_renumbers_in_place(tmp_path: Path, monkeypatch) -> None:
    import detect.proposals.multibox_train as multibox_train

    a = square_scenes(tmp_path / "a", 3)  # ids 1..3 in each set
    b = square_scenes(tmp_path / "b", 2)
    opened = {}
    real_open = multibox_train.open_dataset_spec

    def spy(spec):
        opened[spec.path] = real_open(spec)
        return opened[spec.path]

    monkeypatch.setattr(multibox_train, "open_dataset_spec", spy)
    records = load_records((DatasetSpec(str(a)), DatasetSpec(str(b))))
    assert [r.image_id for r in records] == [1, 2, 3, 4, 5]  # clashing ids: copies numbered 1..N
    assert [r.image_id for r in opened[str(b)][0].records] == [1, 2]  # the data set's own: untouched
    assert records[3] is not opened[str(b)][0].records[0]
    assert records[3].file_name == opened[str(b)][0].records[0].file_name
    only_a = load_records((DatasetSpec(str(a)),))
    assert [r.image_id for r in only_a] == [1, 2, 3]
    assert all(x is y for x, y in zip(only_a, opened[str(a)][0].records, strict=True))  # as they are
    with pytest.raises(ValueError, match="no data set"):
        load_records(())


def test_split_train_val_is_seeded_and_refuses_an_empty_side() -> None:
    records = [DetectionRecord(i, f"{i}.png", 8, 8) for i in range(1, 11)]
    train, val = split_train_val(records, 0.3, seed=1)
    assert len(train) == 7 and len(val) == 3
    assert sorted(r.image_id for r in train + val) == list(range(1, 11))
    again = split_train_val(records, 0.3, seed=1)
    assert [r.image_id for r in again[1]] == [r.image_id for r in val]
    for fraction in (0.0, 1.0):
        with pytest.raises(
            ValueError, match=f"val_fraction {fraction} leaves no train or no val image of 10"
        ):
            split_train_val(records, fraction, seed=0)


def test_config_errors_name_their_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=1)
    out = str(tmp_path / "err")
    with pytest.raises(UserError, match=r"^data\.val_fraction 0\.0 leaves no train"):
        run("--config", str(config), "--out", out, "--set", "data.val_fraction=0.0")
    with pytest.raises(UserError, match="^data.train: no training data set given"):
        run("--config", str(config), "--out", out, "--overwrite", "--set", "data.train=[]")
    with pytest.raises(UserError, match="^model: "):
        run("--config", str(config), "--out", out, "--overwrite", "--set", "model.stage=inception9z")
    with pytest.raises(UserError, match="no such weights file"):  # a WeightsError, not wrapped
        run("--config", str(config), "--out", out, "--overwrite", "--set", f"model.init={tmp_path / 'no.pt'}")
