"""A tiny MultiBox training run through tools/train_multibox.py: loss falls, recall rises, resume works,
the best validated epoch is exported and judged against the priors; detect.proposals.multibox_train's
records and split, and multibox_best's prior recall and best-epoch keeper."""

from __future__ import annotations

import json
import logging
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
from detect.proposals.multibox_best import (
    BEST_FILE,
    BestEpoch,
    compare_with_priors,
    prior_counts,
    priors_recall,
)
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
    # The priors alone, commonest first, find one square in four at k = 1; training learns where it is.
    assert summary["best_val"]["recall@1"] >= summary["priors_val"]["recall@1"] + 40.0
    assert summary["beat_priors"] is True
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "checkpoint.pt", "log.txt", BEST_FILE):
        assert (out / name).is_file()
    model, arch, meta = load_multibox(out / "model.pt")
    assert arch.num_priors == 4 and arch.image_size == 64
    assert meta["trained_from"]["init"] == str(tmp_path / "cls.pt")
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val_recall@1"])  # the first of equals
    assert meta["epoch"] == summary["best_epoch"] == best["epoch"]
    assert meta["val"]["recall@1"] == summary["best_val"]["recall@1"] == best["val_recall@1"]
    assert meta["priors_val"] == summary["priors_val"] and meta["beat_priors"] is True


def test_stopped_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=2)
    assert run("--config", str(config), "--out", str(tmp_path / "full")) == 0
    assert run("--config", str(config), "--out", str(tmp_path / "part"), "--max-steps", "7") == 0
    with pytest.raises(UserError, match="pass --resume"):
        run("--config", str(config), "--out", str(tmp_path / "part"))
    assert run("--config", str(config), "--out", str(tmp_path / "part"), "--resume") == 0
    full, _, full_meta = load_multibox(tmp_path / "full" / "model.pt")
    part, _, part_meta = load_multibox(tmp_path / "part" / "model.pt")
    for (name, a), b in zip(full.state_dict().items(), part.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-4, atol=1e-5)
    assert part_meta["epoch"] == full_meta["epoch"]
    assert part_meta["val"] == pytest.approx(full_meta["val"], rel=1e-4)


def scripted_evaluation(monkeypatch: pytest.MonkeyPatch, recalls: list[float]) -> list[dict]:
    """Replace the tool's validation by the given recall@1 per call; returns each call's weights."""
    seen: list[dict] = []

    def evaluate(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"loss": 1.0, "recall@1": recalls[len(seen) - 1]}

    monkeypatch.setattr(train_multibox, "evaluate_multibox", evaluate)
    return seen


def test_best_epoch_is_exported_and_survives_a_resume(tmp_path: Path, monkeypatch) -> None:
    seen = scripted_evaluation(monkeypatch, [90.0, 50.0, 60.0])  # epoch 1 best, the last one is not
    config = write_config(tmp_path, epochs=3)
    out = tmp_path / "run"
    assert run("--config", str(config), "--out", str(out), "--max-steps", "6") == 0  # 6 steps: 1 epoch
    assert len(seen) == 1 and not (out / "model.pt").exists()
    assert run("--config", str(config), "--out", str(out), "--resume") == 0
    assert len(seen) == 3
    model, _, meta = load_multibox(out / "model.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, seen[0][name], msg=name, rtol=0, atol=0)
    assert meta["epoch"] == 1 and meta["val"]["recall@1"] == 90.0
    assert meta["last_epoch_val"]["recall@1"] == 60.0 and meta["beat_priors"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["val_recall@1"] == 60.0


def test_training_that_does_not_beat_the_priors_says_so(tmp_path: Path, monkeypatch, caplog) -> None:
    scripted_evaluation(monkeypatch, [0.0, 0.0])
    config = write_config(tmp_path, epochs=2)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert run("--config", str(config), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    _, _, meta = load_multibox(out / "model.pt")
    assert summary["priors_val"]["recall@1"] > 0.0
    assert summary["beat_priors"] is False and meta["beat_priors"] is False
    assert meta["epoch"] == 1  # a tie keeps the earlier epoch
    priors = summary["priors_val"]["recall@1"]
    assert f"val recall@1 0.0% (epoch 1 of 2), priors alone {priors:.1f}%" in caplog.text
    assert "training did not beat the k-means priors; model.pt holds its best epoch (1)" in caplog.text


def test_priors_recall_ranks_the_commonest_prior_first() -> None:
    priors = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], np.float32)
    train_boxes = np.array([[0.0, 0.0, 0.4, 0.5], [0.5, 0.5, 1, 1], [0.6, 0.5, 1, 1], [0.5, 0.6, 1, 1]])
    counts = prior_counts(priors, train_boxes)
    assert counts.tolist() == [1, 3]
    targets = [priors[:1], priors[1:], np.zeros((0, 4), np.float32)]  # one box per image, then none
    assert priors_recall(priors, counts, targets, (1, 2)) == {"recall@1": 50.0, "recall@2": 100.0}
    assert compare_with_priors("recall@1", 2, 5, {"recall@1": 50.0}, {"recall@1": 50.0})[0] is False


def test_best_epoch_keeps_the_highest_and_reads_it_back(tmp_path: Path) -> None:
    layer = torch.nn.Linear(2, 1)
    best = BestEpoch(tmp_path, "recall@1", resume=False)
    assert best.update(layer, {"recall@1": 40.0}, epoch=1)
    kept = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not best.update(layer, {"recall@1": 40.0}, epoch=2)  # a tie keeps the earlier epoch
    assert not best.update(layer, {"recall@1": 30.0}, epoch=3)
    again = BestEpoch(tmp_path, "recall@1", resume=True)
    assert (again.epoch, again.metrics) == (1, {"recall@1": 40.0})
    torch.testing.assert_close(again.weights()["weight"], kept["weight"])
    assert again.update(layer, {"recall@1": 41.0}, epoch=4) and again.epoch == 4
    assert BestEpoch(tmp_path, "recall@1", resume=False).epoch is None  # a new run starts afresh
    assert not (tmp_path / BEST_FILE).exists()


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
